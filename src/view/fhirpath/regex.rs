//! Regular expressions for `matches()`, `matchesFull()` and `replaceMatches()`, on the `regex`
//! crate.
//!
//! Why that crate rather than a hand-written engine: it is already in the build (DataFusion's
//! regex functions use it), it matches in time linear in the text with no backtracking — so a
//! pattern in a ViewDefinition cannot hang evaluation — and its syntax is the PCRE/JavaScript
//! core that FHIRPath patterns are written in. Every pattern is compiled once: when the argument
//! is a string literal (or a `%constant`), when the view is compiled, so that a bad pattern
//! fails the view rather than each resource; a pattern computed per resource (`'p' + 't'`) is
//! compiled at each evaluation.
//!
//! Semantics, as the FHIRPath specification asks:
//!
//! * **single-line mode**: `.` also matches a newline (`(?s)`); `^` and `$` match only at the
//!   start and end of the whole string (`(?m)` turns on line anchors);
//! * case-sensitive, Unicode-aware: `\d`, `\w`, `\s` and `\b` follow Unicode (`\d` matches `٣`;
//!   JavaScript's and Java's default `\d` is ASCII only; `[0-9]` is ASCII everywhere);
//! * `matches()` is true when the pattern matches somewhere in the string, `matchesFull()` when
//!   it matches the whole string (as `^(?:pattern)$` would);
//! * `replaceMatches()` replaces every non-overlapping match, leftmost first and by priority
//!   (greedy quantifiers prefer more, lazy ones less, alternatives in order — as Perl and
//!   JavaScript pick). The substitution may name capture groups, as the specification's
//!   example does: `$1`, `${1}`, `${name}` for `(?<name>...)` or `(?P<name>...)`; `$$` is a
//!   literal `$`, and a group that did not take part is empty. An empty match right after the
//!   end of the previous match is skipped, so `'baaa'.replaceMatches('a*', '-')` is `-b-`, where
//!   JavaScript gives `-b--`.
//!
//! Not supported, because the crate guarantees linear time and these need backtracking:
//! **back-references** (`\1`, `\k<name>`) and **look-around** (`(?=`, `(?!`, `(?<=`, `(?<!`).
//! A pattern using them is a compile error naming the construct, as is any other invalid
//! pattern. A pattern whose compiled program would exceed [`MAX_REGEX_BYTES`] (such as
//! `(a{1000}){1000}`), or that nests deeper than [`MAX_REGEX_NESTING`], is an error too, so a
//! hostile ViewDefinition cannot make compilation exhaust memory.

use regex::RegexBuilder;

/// Largest compiled program of one pattern (1 MiB); larger ones fail to compile.
pub(crate) const MAX_REGEX_BYTES: usize = 1 << 20;
/// Deepest nesting of groups and repetitions in a pattern.
pub(crate) const MAX_REGEX_NESTING: u32 = 64;

/// A compiled regular expression, with its whole-string form for `matchesFull()`.
#[derive(Clone, Debug)]
pub(crate) struct Regex {
    /// The pattern as written: matches anywhere.
    find: regex::Regex,
    /// `\A(?:pattern)\z`, built on first need only for `matchesFull()`.
    full: Option<regex::Regex>,
}

/// Two regexes are equal when their patterns are (the compiled form follows from it).
impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.find.as_str() == other.find.as_str() && self.full.is_some() == other.full.is_some()
    }
}

/// Compile `pattern` with the FHIRPath flags and the size limits.
fn build(pattern: &str) -> Result<regex::Regex, String> {
    RegexBuilder::new(pattern)
        .dot_matches_new_line(true)
        .size_limit(MAX_REGEX_BYTES)
        .dfa_size_limit(MAX_REGEX_BYTES)
        .nest_limit(MAX_REGEX_NESTING)
        .build()
        .map_err(|e| describe(pattern, &e))
}

/// One line naming the pattern and what is wrong with it (the crate's syntax errors are a
/// multi-line drawing; its last line says what is wrong).
fn describe(pattern: &str, e: &regex::Error) -> String {
    let what = match e {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or(s.as_str())
            .to_string(),
        regex::Error::CompiledTooBig(limit) => {
            format!("compiled pattern is larger than the limit of {limit} bytes")
        }
        other => other.to_string(),
    };
    format!("invalid regular expression '{pattern}': {what}")
}

impl Regex {
    /// Compile `pattern` for `matches()` and `replaceMatches()`; the error names the pattern.
    pub(crate) fn new(pattern: &str) -> Result<Regex, String> {
        Ok(Regex {
            find: build(pattern)?,
            full: None,
        })
    }

    /// Compile `pattern` for `matchesFull()` too.
    pub(crate) fn new_full(pattern: &str) -> Result<Regex, String> {
        let find = build(pattern)?;
        // `pattern` compiled alone, so its groups balance and wrapping it cannot change its
        // meaning.
        let full = build(&format!(r"\A(?:{pattern})\z"))?;
        Ok(Regex {
            find,
            full: Some(full),
        })
    }

    /// True when the pattern matches somewhere in `text`.
    pub(crate) fn is_match(&self, text: &str) -> bool {
        self.find.is_match(text)
    }

    /// True when the pattern matches all of `text` (some match spans it, even if the leftmost
    /// one by priority does not: `a|ab` fully matches `ab`).
    pub(crate) fn is_full_match(&self, text: &str) -> bool {
        match &self.full {
            Some(full) => full.is_match(text),
            // Only `new_full` regexes are used for `matchesFull()`; compile on demand otherwise.
            None => build(&format!(r"\A(?:{})\z", self.find.as_str()))
                .is_ok_and(|full| full.is_match(text)),
        }
    }

    /// Replace every non-overlapping match with `replacement`, expanding `$1`/`${name}`.
    pub(crate) fn replace_all(&self, text: &str, replacement: &str) -> String {
        self.find.replace_all(text, replacement).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Regex::new(p).unwrap_or_else(|e| panic!("{e}")).is_match(t)
    }

    fn full(p: &str, t: &str) -> bool {
        Regex::new_full(p)
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
        assert!(m("^(?:a|b)+$", "abba"));
        assert!(m("[\\]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("http://loinc\\.org", "http://loinc.org"));
        assert!(m("\\bcat\\b", "a cat sat"));
        assert!(full("[0-9]+", "123"));
        assert!(!full("[0-9]+", "123a"));
        assert!(!full("[0-9]+", "a123"));
        // Some match spans the text, although the preferred one (`a`) does not.
        assert!(full("a|ab", "ab"));
        assert!(full("", ""));
    }

    /// FHIRPath asks for single-line mode: `.` matches a newline; `^`/`$` are the string's ends.
    #[test]
    fn single_line_mode() {
        assert!(m("^a.b$", "a\nb"));
        assert!(full("a.*b", "a\n\nb"));
        assert!(!m("^b", "a\nb"));
        assert!(!m("a$", "a\nb"));
        assert!(m("(?m)^b", "a\nb"));
    }

    #[test]
    fn pathological_patterns_are_linear() {
        let text = "a".repeat(50_000);
        assert!(!m("^(a*)*b$", &text));
        assert!(!m("(a|aa)+c", &text));
        assert!(m("(a|a)*", &text));
        assert!(!full("(a?){40}a{40}b", &"a".repeat(40)));
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
        assert_eq!(rep("a*", "baaa", "-"), "-b-");
        assert_eq!(rep("é", "café", "e"), "cafe");
    }

    /// The FHIRPath specification's example: the substitution names capture groups.
    #[test]
    fn substitution_refers_to_groups() {
        assert_eq!(
            rep(
                r"\b(?<month>\d{1,2})/(?<day>\d{1,2})/(?<year>\d{2,4})\b",
                "11/30/1972",
                "${day}-${month}-${year}"
            ),
            "30-11-1972"
        );
        assert_eq!(rep("(a)(b)?", "ac", "[$2$1]"), "[a]c");
        assert_eq!(rep("x", "axb", "$$"), "a$b");
        assert_eq!(rep("(x)", "axb", "${1}1"), "ax1b");
    }

    #[test]
    fn errors() {
        for bad in [
            "(", ")", "a)", "[abc", "*a", "\\", "[z-a]", "a{3,2}", "a{99999}",
        ] {
            let e = Regex::new(bad).expect_err(bad);
            assert!(
                e.starts_with(&format!("invalid regular expression '{bad}': ")),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let deep = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(Regex::new(&deep).is_err());
        let big = Regex::new("(a{1000}){1000}").expect_err("too big");
        assert!(big.contains("larger than the limit"), "{big}");
    }

    /// What the crate cannot do fails to compile, naming the construct.
    #[test]
    fn backreferences_and_lookaround_are_compile_errors() {
        for (bad, says) in [
            (r"(a)\1", "backreferences are not supported"),
            ("(?=a)", "look-around"),
            ("(?!a)", "look-around"),
            ("(?<=a)b", "look-around"),
            ("(?<!a)b", "look-around"),
        ] {
            let e = Regex::new(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
