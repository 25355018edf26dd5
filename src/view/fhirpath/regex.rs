//! A small regular-expression engine for `matches()` and `replaceMatches()`.
//!
//! It compiles the pattern to a Thompson NFA and simulates it (Pike VM), so matching time is
//! linear in `text × pattern` with no backtracking: a hostile pattern cannot hang evaluation.
//! Supported: literals, `.`, `[...]`/`[^...]` classes with ranges, `\d \D \w \W \s \S`, escaped
//! metacharacters, `\n \t \r`, `^`, `$`, groups `( )` (also `(?: )`; they do not capture),
//! alternation `|`, and the quantifiers `* + ? {n} {n,} {n,m}`, greedy or lazy (`*?`). Matches
//! are chosen as Perl/JavaScript engines choose them (leftmost, then by priority), so
//! `replaceMatches()` agrees with other FHIRPath implementations; after an empty match the
//! replacement moves on one character, as JavaScript does. One known difference from
//! backtracking engines: a quantified group whose iteration can match the empty string (e.g.
//! `(a?|b){1,2}`) may pick another (equally valid) match. Back-references, look-around and `\b`
//! are rejected.

/// Limits keeping compiled programs small.
const MAX_PATTERN_DEPTH: usize = 32;
const MAX_REPEAT: u32 = 1000;
const MAX_PROGRAM: usize = 20_000;

#[derive(Clone, Debug, PartialEq)]
enum ClassItem {
    Range(char, char),
    Digit(bool),
    Word(bool),
    Space(bool),
}

fn class_item_matches(item: &ClassItem, c: char) -> bool {
    match item {
        ClassItem::Range(a, b) => *a <= c && c <= *b,
        ClassItem::Digit(neg) => c.is_ascii_digit() != *neg,
        ClassItem::Word(neg) => (c.is_alphanumeric() || c == '_') != *neg,
        ClassItem::Space(neg) => c.is_whitespace() != *neg,
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Class {
    items: Vec<ClassItem>,
    negated: bool,
}

impl Class {
    fn matches(&self, c: char) -> bool {
        self.items.iter().any(|i| class_item_matches(i, c)) != self.negated
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Ast {
    Empty,
    Char(char),
    Any,
    Class(Class),
    Bol,
    Eol,
    Concat(Vec<Ast>),
    Alt(Vec<Ast>),
    Repeat {
        node: Box<Ast>,
        min: u32,
        max: Option<u32>,
        greedy: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Inst {
    Char(char),
    Any,
    Class(usize),
    Split(usize, usize),
    Jmp(usize),
    Bol,
    Eol,
    Match,
}

/// A compiled regular expression.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Regex {
    prog: Vec<Inst>,
    classes: Vec<Class>,
}

struct PatternParser<'p> {
    chars: Vec<char>,
    pos: usize,
    src: &'p str,
}

impl PatternParser<'_> {
    fn err(&self, msg: &str) -> String {
        format!("invalid regular expression '{}': {msg}", self.src)
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn alt(&mut self, depth: usize) -> Result<Ast, String> {
        if depth > MAX_PATTERN_DEPTH {
            return Err(self.err("groups nest too deeply"));
        }
        let mut branches = vec![self.concat(depth)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            branches.push(self.concat(depth)?);
        }
        Ok(if branches.len() == 1 {
            branches.pop().unwrap_or(Ast::Empty)
        } else {
            Ast::Alt(branches)
        })
    }

    fn concat(&mut self, depth: usize) -> Result<Ast, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom(depth)?;
            let atom = self.quantifier(atom)?;
            items.push(atom);
        }
        Ok(Ast::Concat(items))
    }

    fn quantifier(&mut self, atom: Ast) -> Result<Ast, String> {
        let (min, max) = match self.peek() {
            Some('*') => {
                self.pos += 1;
                (0, None)
            }
            Some('+') => {
                self.pos += 1;
                (1, None)
            }
            Some('?') => {
                self.pos += 1;
                (0, Some(1))
            }
            Some('{') => match self.counted()? {
                Some(mm) => mm,
                None => return Ok(atom),
            },
            _ => return Ok(atom),
        };
        let greedy = if self.peek() == Some('?') {
            self.pos += 1;
            false
        } else {
            true
        };
        if matches!(atom, Ast::Bol | Ast::Eol | Ast::Empty) {
            return Err(self.err("nothing to repeat"));
        }
        if matches!(self.peek(), Some('*' | '+')) {
            return Err(self.err("nested quantifier"));
        }
        Ok(Ast::Repeat {
            node: Box::new(atom),
            min,
            max,
            greedy,
        })
    }

    /// `{n}`, `{n,}`, `{n,m}`; `None` (and nothing consumed) when `{` is a literal.
    fn counted(&mut self) -> Result<Option<(u32, Option<u32>)>, String> {
        let start = self.pos;
        self.pos += 1;
        let num = |p: &mut Self| -> Option<u32> {
            let s = p.pos;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.pos += 1;
            }
            let text: String = p.chars[s..p.pos].iter().collect();
            text.parse().ok()
        };
        let Some(min) = num(self) else {
            self.pos = start;
            return Ok(None);
        };
        let max = if self.peek() == Some(',') {
            self.pos += 1;
            if self.peek() == Some('}') {
                None
            } else {
                match num(self) {
                    Some(m) => Some(m),
                    None => {
                        self.pos = start;
                        return Ok(None);
                    }
                }
            }
        } else {
            Some(min)
        };
        if self.peek() != Some('}') {
            self.pos = start;
            return Ok(None);
        }
        self.pos += 1;
        if min > MAX_REPEAT || max.is_some_and(|m| m > MAX_REPEAT || m < min) {
            return Err(self.err("invalid repetition count"));
        }
        Ok(Some((min, max)))
    }

    fn atom(&mut self, depth: usize) -> Result<Ast, String> {
        let Some(c) = self.peek() else {
            return Err(self.err("unexpected end"));
        };
        self.pos += 1;
        Ok(match c {
            '.' => Ast::Any,
            '^' => Ast::Bol,
            '$' => Ast::Eol,
            '(' => {
                if self.peek() == Some('?') {
                    if self.chars.get(self.pos + 1) == Some(&':') {
                        self.pos += 2;
                    } else {
                        return Err(self.err("look-around and flags are not supported"));
                    }
                }
                let inner = self.alt(depth + 1)?;
                if self.peek() != Some(')') {
                    return Err(self.err("missing )"));
                }
                self.pos += 1;
                inner
            }
            ')' => return Err(self.err("unbalanced )")),
            '*' | '+' | '?' => return Err(self.err("nothing to repeat")),
            '[' => Ast::Class(self.class()?),
            '\\' => match self.escape()? {
                Esc::Char(c) => Ast::Char(c),
                Esc::Class(i) => Ast::Class(Class {
                    items: vec![i],
                    negated: false,
                }),
            },
            other => Ast::Char(other),
        })
    }

    fn escape(&mut self) -> Result<Esc, String> {
        let Some(c) = self.peek() else {
            return Err(self.err("trailing backslash"));
        };
        self.pos += 1;
        Ok(match c {
            'd' => Esc::Class(ClassItem::Digit(false)),
            'D' => Esc::Class(ClassItem::Digit(true)),
            'w' => Esc::Class(ClassItem::Word(false)),
            'W' => Esc::Class(ClassItem::Word(true)),
            's' => Esc::Class(ClassItem::Space(false)),
            'S' => Esc::Class(ClassItem::Space(true)),
            'n' => Esc::Char('\n'),
            't' => Esc::Char('\t'),
            'r' => Esc::Char('\r'),
            c if c.is_ascii_alphanumeric() => {
                return Err(self.err(&format!("unsupported escape \\{c}")));
            }
            c => Esc::Char(c),
        })
    }

    fn class(&mut self) -> Result<Class, String> {
        let mut negated = false;
        if self.peek() == Some('^') {
            negated = true;
            self.pos += 1;
        }
        let mut items = Vec::new();
        let mut first = true;
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("missing ]"));
            };
            self.pos += 1;
            if c == ']' && !first {
                break;
            }
            first = false;
            let lo = match c {
                '\\' => match self.escape()? {
                    Esc::Char(c) => c,
                    Esc::Class(i) => {
                        items.push(i);
                        continue;
                    }
                },
                c => c,
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|c| *c != ']') {
                self.pos += 1;
                let Some(hi) = self.peek() else {
                    return Err(self.err("missing ]"));
                };
                self.pos += 1;
                let hi = if hi == '\\' {
                    match self.escape()? {
                        Esc::Char(c) => c,
                        Esc::Class(_) => return Err(self.err("invalid class range")),
                    }
                } else {
                    hi
                };
                if hi < lo {
                    return Err(self.err("invalid class range"));
                }
                items.push(ClassItem::Range(lo, hi));
            } else {
                items.push(ClassItem::Range(lo, lo));
            }
        }
        Ok(Class { items, negated })
    }
}

enum Esc {
    Char(char),
    Class(ClassItem),
}

struct Compiler {
    prog: Vec<Inst>,
    classes: Vec<Class>,
    /// Emit calls left (bounds compile time for repeated empty groups).
    budget: usize,
}

impl Compiler {
    fn push(&mut self, i: Inst) -> Result<usize, String> {
        if self.prog.len() >= MAX_PROGRAM {
            return Err("regular expression is too large".to_string());
        }
        self.prog.push(i);
        Ok(self.prog.len() - 1)
    }

    fn set(&mut self, at: usize, i: Inst) {
        if let Some(slot) = self.prog.get_mut(at) {
            *slot = i;
        }
    }

    fn emit(&mut self, ast: &Ast) -> Result<(), String> {
        self.budget = self
            .budget
            .checked_sub(1)
            .ok_or_else(|| "regular expression is too large".to_string())?;
        match ast {
            Ast::Empty => {}
            Ast::Char(c) => {
                self.push(Inst::Char(*c))?;
            }
            Ast::Any => {
                self.push(Inst::Any)?;
            }
            Ast::Bol => {
                self.push(Inst::Bol)?;
            }
            Ast::Eol => {
                self.push(Inst::Eol)?;
            }
            Ast::Class(c) => {
                self.classes.push(c.clone());
                self.push(Inst::Class(self.classes.len() - 1))?;
            }
            Ast::Concat(items) => {
                for i in items {
                    self.emit(i)?;
                }
            }
            Ast::Alt(branches) => {
                let mut jumps = Vec::new();
                for (i, b) in branches.iter().enumerate() {
                    if i + 1 < branches.len() {
                        let split = self.push(Inst::Split(0, 0))?;
                        self.emit(b)?;
                        jumps.push(self.push(Inst::Jmp(0))?);
                        let next = self.prog.len();
                        self.set(split, Inst::Split(split + 1, next));
                    } else {
                        self.emit(b)?;
                    }
                }
                let end = self.prog.len();
                for j in jumps {
                    self.set(j, Inst::Jmp(end));
                }
            }
            Ast::Repeat {
                node,
                min,
                max,
                greedy,
            } => {
                // Preferred branch first: stay in the loop when greedy, leave it when lazy.
                let split = |stay: usize, leave: usize| {
                    if *greedy {
                        Inst::Split(stay, leave)
                    } else {
                        Inst::Split(leave, stay)
                    }
                };
                for _ in 0..*min {
                    self.emit(node)?;
                }
                match max {
                    None => {
                        // x*: L1: split L2, L3; L2: x; jmp L1; L3:
                        let l1 = self.push(Inst::Split(0, 0))?;
                        self.emit(node)?;
                        self.push(Inst::Jmp(l1))?;
                        let l3 = self.prog.len();
                        self.set(l1, split(l1 + 1, l3));
                    }
                    Some(max) => {
                        let mut splits = Vec::new();
                        for _ in *min..*max {
                            splits.push(self.push(Inst::Split(0, 0))?);
                            self.emit(node)?;
                        }
                        let end = self.prog.len();
                        for s in splits {
                            self.set(s, split(s + 1, end));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Regex {
    /// Compile `pattern`; the error message names the pattern.
    pub(crate) fn new(pattern: &str) -> Result<Regex, String> {
        let mut p = PatternParser {
            chars: pattern.chars().collect(),
            pos: 0,
            src: pattern,
        };
        let ast = p.alt(0)?;
        if p.pos < p.chars.len() {
            return Err(p.err("unbalanced )"));
        }
        let mut c = Compiler {
            prog: Vec::new(),
            classes: Vec::new(),
            budget: 4 * MAX_PROGRAM,
        };
        c.emit(&ast)?;
        c.push(Inst::Match)?;
        Ok(Regex {
            prog: c.prog,
            classes: c.classes,
        })
    }

    /// True when the pattern matches somewhere in `text`.
    pub(crate) fn is_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        self.run(&chars, 0, true).is_some()
    }

    /// True when the pattern matches all of `text`.
    pub(crate) fn is_full_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        // Any path from 0 covering everything.
        matches!(self.run_anchored(&chars), Some(end) if end == chars.len())
    }

    /// Replace every (non-overlapping) match with `replacement`.
    pub(crate) fn replace_all(&self, text: &str, replacement: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::new();
        let mut from = 0;
        while from <= chars.len() {
            match self.run(&chars, from, false) {
                Some((s, e)) => {
                    out.extend(&chars[from..s]);
                    out.push_str(replacement);
                    if e == s {
                        if let Some(c) = chars.get(s) {
                            out.push(*c);
                        }
                        from = s + 1;
                    } else {
                        from = e;
                    }
                }
                None => {
                    out.extend(&chars[from..]);
                    break;
                }
            }
        }
        out
    }

    /// Add `pc`'s epsilon closure at position `i` to `list` (threads tagged with `start`).
    /// Marks use the position `i` as generation, so each position dedupes separately.
    fn add(
        &self,
        list: &mut Vec<(usize, usize)>,
        mark: &mut [usize],
        pc: usize,
        start: usize,
        i: usize,
        len: usize,
    ) {
        let mut stack = vec![pc];
        while let Some(pc) = stack.pop() {
            let Some(m) = mark.get_mut(pc) else {
                continue;
            };
            if *m == i {
                continue;
            }
            *m = i;
            match self.prog.get(pc) {
                Some(Inst::Jmp(t)) => stack.push(*t),
                Some(Inst::Split(a, b)) => {
                    // Push b first so a is explored first (priority).
                    stack.push(*b);
                    stack.push(*a);
                }
                Some(Inst::Bol) if i == 0 => stack.push(pc + 1),
                Some(Inst::Eol) if i == len => stack.push(pc + 1),
                Some(Inst::Bol | Inst::Eol) => {}
                Some(_) => list.push((pc, start)),
                None => {}
            }
        }
    }

    fn consumes(&self, inst: &Inst, c: char) -> bool {
        match inst {
            Inst::Char(x) => *x == c,
            Inst::Any => true,
            Inst::Class(k) => self.classes.get(*k).is_some_and(|cl| cl.matches(c)),
            _ => false,
        }
    }

    /// First match (leftmost, then by Perl-style priority: greedy quantifiers prefer more,
    /// lazy ones less, alternatives in order) starting at or after char index `from`.
    fn run(&self, chars: &[char], from: usize, first_only: bool) -> Option<(usize, usize)> {
        let len = chars.len();
        let mut mark = vec![usize::MAX; self.prog.len()];
        let mut clist: Vec<(usize, usize)> = Vec::new();
        let mut best: Option<(usize, usize)> = None;
        for i in from..=len {
            if best.is_none() {
                // A new thread starting here, with the lowest priority.
                self.add(&mut clist, &mut mark, 0, i, i, len);
            }
            if clist.is_empty() {
                if best.is_some() {
                    break;
                }
                continue;
            }
            let mut nlist = Vec::new();
            for &(pc, start) in &clist {
                match self.prog.get(pc) {
                    Some(Inst::Match) => {
                        best = Some((start, i));
                        if first_only {
                            return best;
                        }
                        // Lower-priority threads are cut.
                        break;
                    }
                    Some(inst) => {
                        if let Some(&c) = chars.get(i)
                            && self.consumes(inst, c)
                        {
                            self.add(&mut nlist, &mut mark, pc + 1, start, i + 1, len);
                        }
                    }
                    None => {}
                }
            }
            clist = nlist;
        }
        best
    }

    /// Longest match anchored at 0: its end.
    fn run_anchored(&self, chars: &[char]) -> Option<usize> {
        let len = chars.len();
        let mut mark = vec![usize::MAX; self.prog.len()];
        let mut clist = Vec::new();
        self.add(&mut clist, &mut mark, 0, 0, 0, len);
        let mut end = None;
        for i in 0..=len {
            let mut nlist = Vec::new();
            for &(pc, _) in &clist {
                match self.prog.get(pc) {
                    Some(Inst::Match) => end = Some(i),
                    Some(inst) => {
                        if let Some(&c) = chars.get(i)
                            && self.consumes(inst, c)
                        {
                            self.add(&mut nlist, &mut mark, pc + 1, 0, i + 1, len);
                        }
                    }
                    None => {}
                }
            }
            if nlist.is_empty() {
                break;
            }
            clist = nlist;
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Regex::new(p).unwrap_or_else(|e| panic!("{e}")).is_match(t)
    }

    fn full(p: &str, t: &str) -> bool {
        Regex::new(p)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_full_match(t)
    }

    fn rep(p: &str, t: &str, r: &str) -> String {
        Regex::new(p)
            .unwrap_or_else(|e| panic!("{e}"))
            .replace_all(t, r)
    }

    #[test]
    fn matching() {
        assert!(m("abc", "xxabcxx"));
        assert!(!m("abd", "xxabcxx"));
        assert!(m("^abc$", "abc"));
        assert!(!m("^abc$", "abcd"));
        assert!(m("a.c", "abc"));
        assert!(m("[a-c]+x", "zzbcax"));
        assert!(!m("^[^a-c]+$", "xyzb"));
        assert!(m("\\d{3}-\\d{4}", "call 555-1234"));
        assert!(!m("^\\d{3}$", "12"));
        assert!(m("^(ab|cd)*$", "abcdab"));
        assert!(!m("^(ab|cd)*$", "abc"));
        assert!(m("colou?r", "color"));
        assert!(m("^a{2,3}$", "aaa"));
        assert!(!m("^a{2,3}$", "aaaa"));
        assert!(m("^a{2,}$", "aaaaa"));
        assert!(m("^\\w+@\\w+\\.org$", "me@x.org"));
        assert!(m("\\s", "a b"));
        assert!(m("^$", ""));
        assert!(m("$", "abc"));
        assert!(m("c$", "abc"));
        assert!(!m("^b", "abc"));
        assert!(m("x{", "x{"));
        assert!(m("^(?:a|b)+$", "abba"));
        assert!(m("[\\]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("http://loinc\\.org", "http://loinc.org"));
        assert!(full("[0-9]+", "123"));
        assert!(!full("[0-9]+", "123a"));
    }

    #[test]
    fn pathological_patterns_are_linear() {
        let text = "a".repeat(5000);
        assert!(!m("^(a*)*b$", &text));
        assert!(!m("(a|aa)+c", &text));
        assert!(m("(a|a)*", &text));
    }

    #[test]
    fn replacing() {
        assert_eq!(rep("[0-9]+", "a1b22c", "#"), "a#b#c");
        assert_eq!(rep("x*", "ab", "-"), "-a-b-");
        assert_eq!(rep("^a", "aaa", "b"), "baa");
        assert_eq!(rep("a|ab", "abab", "X"), "XbXb");
        assert_eq!(rep("a+?", "aaa", "X"), "XXX");
        assert_eq!(rep("a+", "aaa", "X"), "X");
        assert_eq!(rep("<.*?>", "<a><b>", "_"), "__");
    }

    #[test]
    fn errors() {
        for bad in [
            "(", ")", "a)", "[abc", "*a", "a**", "\\", "\\b", "(?=a)", "[z-a]", "a{3,2}",
            "a{99999}", "^*",
        ] {
            assert!(Regex::new(bad).is_err(), "{bad:?}");
        }
        let deep = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(Regex::new(&deep).is_err());
        assert!(Regex::new("(a{1000}){1000}").is_err());
    }
}
