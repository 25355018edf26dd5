//! Tokenizer for FHIRPath source text.

/// A token kind.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok {
    /// Identifier or keyword (`and`, `div`, `true`, ...); `quoted` for `` `delimited` `` names,
    /// which are never keywords.
    Ident { name: String, quoted: bool },
    /// `'string'` with escapes resolved.
    Str(String),
    /// Integer literal (digits only).
    Int(String),
    /// Decimal literal (`1.5`).
    Dec(String),
    /// `@2020-01-01` (lexical form without `@`).
    Date(String),
    /// `@2020-01-01T10:00:00Z` (lexical form without `@`).
    DateTime(String),
    /// `@T12:00` (lexical form without `@T`).
    Time(String),
    /// `%name`, `` %`name` `` or `%'name'`.
    Const(String),
    /// `$this`, `$index`, `$total`.
    Var(String),
    /// Punctuation or symbolic operator.
    Sym(&'static str),
    /// End of input.
    Eof,
}

/// A token with the byte offset where it starts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Token {
    pub(crate) tok: Tok,
    pub(crate) pos: usize,
}

/// A lexing failure: byte offset and message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LexError {
    pub(crate) pos: usize,
    pub(crate) message: String,
}

const SYMBOLS: &[&str] = &[
    "!=", "!~", "<=", ">=", ".", "(", ")", "[", "]", "{", "}", ",", "+", "-", "*", "/", "&", "|",
    "=", "~", "<", ">",
];

/// Split `src` into tokens, ending with [`Tok::Eof`].
pub(crate) fn tokenize(src: &str) -> Result<Vec<Token>, LexError> {
    let mut lx = Lexer {
        src,
        bytes: src.as_bytes(),
        pos: 0,
    };
    let mut out = Vec::new();
    loop {
        lx.skip_trivia()?;
        let start = lx.pos;
        let Some(&b) = lx.bytes.get(lx.pos) else {
            out.push(Token {
                tok: Tok::Eof,
                pos: start,
            });
            return Ok(out);
        };
        let tok = match b {
            b'\'' => Tok::Str(lx.quoted(b'\'')?),
            b'`' => Tok::Ident {
                name: lx.quoted(b'`')?,
                quoted: true,
            },
            b'0'..=b'9' => lx.number(),
            b'@' => lx.temporal()?,
            b'%' => {
                lx.pos += 1;
                match lx.bytes.get(lx.pos) {
                    Some(b'\'') => Tok::Const(lx.quoted(b'\'')?),
                    Some(b'`') => Tok::Const(lx.quoted(b'`')?),
                    Some(c) if is_ident_start(*c) => Tok::Const(lx.ident().to_string()),
                    _ => return Err(lx.err(start, "expected a constant name after `%`")),
                }
            }
            b'$' => {
                lx.pos += 1;
                match lx.bytes.get(lx.pos) {
                    Some(c) if is_ident_start(*c) => Tok::Var(lx.ident().to_string()),
                    _ => return Err(lx.err(start, "expected `$this`, `$index` or `$total`")),
                }
            }
            c if is_ident_start(c) => Tok::Ident {
                name: lx.ident().to_string(),
                quoted: false,
            },
            _ => {
                let rest = &lx.src[lx.pos..];
                match SYMBOLS.iter().find(|s| rest.starts_with(**s)) {
                    Some(s) => {
                        lx.pos += s.len();
                        Tok::Sym(s)
                    }
                    None => {
                        let ch = rest.chars().next().unwrap_or('?');
                        return Err(lx.err(start, &format!("unexpected character `{ch}`")));
                    }
                }
            }
        };
        out.push(Token { tok, pos: start });
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

struct Lexer<'s> {
    src: &'s str,
    bytes: &'s [u8],
    pos: usize,
}

impl<'s> Lexer<'s> {
    fn err(&self, pos: usize, message: &str) -> LexError {
        LexError {
            pos,
            message: message.to_string(),
        }
    }

    fn peek(&self, off: usize) -> Option<u8> {
        self.bytes.get(self.pos + off).copied()
    }

    fn skip_trivia(&mut self) -> Result<(), LexError> {
        loop {
            match self.peek(0) {
                Some(c) if c.is_ascii_whitespace() => self.pos += 1,
                Some(b'/') if self.peek(1) == Some(b'/') => {
                    while let Some(c) = self.peek(0) {
                        if c == b'\n' {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                Some(b'/') if self.peek(1) == Some(b'*') => {
                    let start = self.pos;
                    match self.src[self.pos + 2..].find("*/") {
                        Some(end) => self.pos += 2 + end + 2,
                        None => return Err(self.err(start, "unterminated comment")),
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn ident(&mut self) -> &'s str {
        let start = self.pos;
        while self.peek(0).is_some_and(is_ident_char) {
            self.pos += 1;
        }
        &self.src[start..self.pos]
    }

    /// A `'...'` or `` `...` `` literal starting at `self.pos`, escapes resolved.
    fn quoted(&mut self, quote: u8) -> Result<String, LexError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let rest = &self.src[self.pos..];
            let mut chars = rest.chars();
            let Some(c) = chars.next() else {
                return Err(self.err(start, "unterminated quoted literal"));
            };
            self.pos += c.len_utf8();
            if c as u32 == u32::from(quote) {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = chars.next() else {
                return Err(self.err(start, "unterminated quoted literal"));
            };
            self.pos += e.len_utf8();
            match e {
                '\'' | '"' | '`' | '\\' | '/' => out.push(e),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex = self.src.get(self.pos..self.pos + 4).unwrap_or("");
                    let code = (hex.len() == 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                        .then(|| u32::from_str_radix(hex, 16).ok())
                        .flatten()
                        .and_then(char::from_u32);
                    match code {
                        Some(ch) => {
                            out.push(ch);
                            self.pos += 4;
                        }
                        None => return Err(self.err(self.pos - 2, "invalid \\u escape")),
                    }
                }
                _ => return Err(self.err(self.pos - 2, &format!("invalid escape `\\{e}`"))),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Tok {
        let start = self.pos;
        self.digits();
        if self.peek(0) == Some(b'.') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            self.digits();
            Tok::Dec(self.src[start..self.pos].to_string())
        } else {
            Tok::Int(self.src[start..self.pos].to_string())
        }
    }

    /// `@` date, dateTime or time literal.
    fn temporal(&mut self) -> Result<Tok, LexError> {
        let start = self.pos;
        self.pos += 1;
        if self.peek(0) == Some(b'T') {
            self.pos += 1;
            let t0 = self.pos;
            self.time_part(start)?;
            return Ok(Tok::Time(self.src[t0..self.pos].to_string()));
        }
        let d0 = self.pos;
        if self.digits() != 4 {
            return Err(self.err(start, "invalid date literal: expected a 4-digit year"));
        }
        for _ in 0..2 {
            if self.peek(0) == Some(b'-') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
                if self.digits() != 2 {
                    return Err(self.err(start, "invalid date literal"));
                }
            } else {
                break;
            }
        }
        if self.peek(0) != Some(b'T') {
            return Ok(Tok::Date(self.src[d0..self.pos].to_string()));
        }
        self.pos += 1;
        if self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
            self.time_part(start)?;
        }
        // Time zone.
        match self.peek(0) {
            Some(b'Z') => self.pos += 1,
            Some(b'+') | Some(b'-')
                if self.peek(1).is_some_and(|c| c.is_ascii_digit())
                    && self
                        .bytes
                        .get(self.pos - 1)
                        .is_some_and(|c| c.is_ascii_digit()) =>
            {
                self.pos += 1;
                let ok = self.digits() == 2 && self.peek(0) == Some(b':') && {
                    self.pos += 1;
                    self.digits() == 2
                };
                if !ok {
                    return Err(self.err(start, "invalid time zone in dateTime literal"));
                }
            }
            _ => {}
        }
        let mut text = self.src[d0..self.pos].to_string();
        if text.ends_with('T') {
            text.pop();
        }
        Ok(Tok::DateTime(text))
    }

    /// `hh(:mm(:ss(.fff)?)?)?`
    fn time_part(&mut self, start: usize) -> Result<(), LexError> {
        if self.digits() != 2 {
            return Err(self.err(start, "invalid time literal: expected 2-digit hours"));
        }
        for _ in 0..2 {
            if self.peek(0) == Some(b':') {
                self.pos += 1;
                if self.digits() != 2 {
                    return Err(self.err(start, "invalid time literal"));
                }
            } else {
                return Ok(());
            }
        }
        if self.peek(0) == Some(b'.') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            self.digits();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s)
            .expect("lexes")
            .into_iter()
            .map(|t| t.tok)
            .collect()
    }

    #[test]
    fn basic_tokens() {
        assert_eq!(
            toks("name.where(use = 'a\\'b')"),
            vec![
                Tok::Ident {
                    name: "name".into(),
                    quoted: false
                },
                Tok::Sym("."),
                Tok::Ident {
                    name: "where".into(),
                    quoted: false
                },
                Tok::Sym("("),
                Tok::Ident {
                    name: "use".into(),
                    quoted: false
                },
                Tok::Sym("="),
                Tok::Str("a'b".into()),
                Tok::Sym(")"),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn numbers_and_temporals() {
        assert_eq!(toks("1.5")[0], Tok::Dec("1.5".into()));
        assert_eq!(toks("15")[0], Tok::Int("15".into()));
        // `1.first()` is an integer followed by an invocation.
        assert_eq!(toks("1.first()")[0], Tok::Int("1".into()));
        assert_eq!(toks("@2020-01-02")[0], Tok::Date("2020-01-02".into()));
        assert_eq!(toks("@2020")[0], Tok::Date("2020".into()));
        assert_eq!(
            toks("@2020-01-02T10:00:00.123+02:00")[0],
            Tok::DateTime("2020-01-02T10:00:00.123+02:00".into())
        );
        assert_eq!(toks("@2020-01-02T")[0], Tok::DateTime("2020-01-02".into()));
        assert_eq!(toks("@T12:30")[0], Tok::Time("12:30".into()));
        assert_eq!(toks("%rowIndex")[0], Tok::Const("rowIndex".into()));
        assert_eq!(toks("%`a b`")[0], Tok::Const("a b".into()));
        assert_eq!(toks("$this")[0], Tok::Var("this".into()));
        assert_eq!(toks("a <= b")[1], Tok::Sym("<="));
        assert_eq!(toks("a // c\n")[1], Tok::Eof);
        assert_eq!(toks("a /* c */ b").len(), 3);
        assert_eq!(toks("'\\u00e9'")[0], Tok::Str("é".into()));
    }

    #[test]
    fn lex_errors() {
        assert!(tokenize("@@").is_err());
        assert!(tokenize("'abc").is_err());
        assert!(tokenize("a # b").is_err());
        assert!(tokenize("%").is_err());
        assert!(tokenize("'\\q'").is_err());
        assert!(tokenize("/* x").is_err());
        assert!(tokenize("@20").is_err());
        assert!(tokenize("'\\u12'").is_err());
    }
}
