//! Final matchers: a resource pattern after its variables are substituted, ready to test
//! resource names on the hot path without allocating.
//!
//! Policy wildcards, not MQTT ones: [`Tok::Star`] matches any run of characters (across `/`,
//! possibly empty), [`Tok::One`] exactly one character; everything else, `+` and `#`
//! included, is a literal byte. Most real resources are an exact name or a prefix followed by
//! one trailing `*`, so those get their own variants and cost one comparison.

/// One token of a compiled glob. Literals are kept as UTF-8 bytes; `One` consumes a whole
/// character, so `?` matches `é` as one character, as a policy author expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Tok {
    Byte(u8),
    One,
    Star,
}

/// A compiled resource pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Matcher {
    /// `*` (or only stars): every name.
    Everything,
    /// No wildcard at all.
    Exact(Box<str>),
    /// A literal followed by one trailing `*`.
    Prefix(Box<str>),
    /// Anything else.
    Glob(Box<[Tok]>),
}

impl Matcher {
    /// Builds the cheapest matcher equivalent to `toks`. Runs of stars are collapsed first,
    /// which keeps the glob loop's backtracking bounded by one star at a time.
    pub(crate) fn compile(toks: Vec<Tok>) -> Matcher {
        let mut out: Vec<Tok> = Vec::with_capacity(toks.len());
        for t in toks {
            if t == Tok::Star && out.last() == Some(&Tok::Star) {
                continue;
            }
            out.push(t);
        }
        if out.iter().all(|t| *t == Tok::Star) && !out.is_empty() {
            return Matcher::Everything;
        }
        let stars = out.iter().filter(|t| **t == Tok::Star).count();
        let ones = out.contains(&Tok::One);
        if !ones && stars == 0 {
            return Matcher::Exact(literal(&out).into());
        }
        if !ones && stars == 1 && out.last() == Some(&Tok::Star) {
            return Matcher::Prefix(literal(&out[..out.len() - 1]).into());
        }
        Matcher::Glob(out.into_boxed_slice())
    }

    /// Whether `name` is matched. Never allocates.
    pub(crate) fn matches(&self, name: &str) -> bool {
        match self {
            Matcher::Everything => true,
            Matcher::Exact(s) => name == &**s,
            Matcher::Prefix(p) => name.starts_with(&**p),
            Matcher::Glob(toks) => glob(toks, name.as_bytes()),
        }
    }
}

/// The literal bytes of a token run that holds only `Byte`s. They were produced from whole
/// UTF-8 strings, so they decode; the lossy fallback is unreachable in practice.
fn literal(toks: &[Tok]) -> String {
    let bytes: Vec<u8> = toks
        .iter()
        .filter_map(|t| match t {
            Tok::Byte(b) => Some(*b),
            _ => None,
        })
        .collect();
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Length of the UTF-8 character that starts with byte `b`.
fn char_len(b: u8) -> usize {
    match b {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Greedy two-pointer glob match with backtracking to the last star: O(n*m) in the worst
/// case, linear for the patterns policies use. `s` is valid UTF-8 and literal tokens are
/// whole characters, so every place a `One` or a backtrack starts is a character boundary.
fn glob(p: &[Tok], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    // (token after the last star, subject position that star's match currently ends at)
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(Tok::Star) => {
                pi += 1;
                star = Some((pi, si));
                continue;
            }
            Some(Tok::One) => {
                pi += 1;
                si += char_len(s[si]);
                continue;
            }
            Some(Tok::Byte(b)) if *b == s[si] => {
                pi += 1;
                si += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((after, end)) => {
                // Let the last star swallow one more character and retry from there.
                let end = end + char_len(s[end]);
                star = Some((after, end));
                pi = after;
                si = end;
            }
            None => return false,
        }
    }
    si == s.len() && p[pi..].iter().all(|t| *t == Tok::Star)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Tokens for a raw pattern where `*` and `?` are wildcards and everything else literal.
    fn toks(pattern: &str) -> Vec<Tok> {
        let mut out = Vec::new();
        for c in pattern.chars() {
            match c {
                '*' => out.push(Tok::Star),
                '?' => out.push(Tok::One),
                c => {
                    let mut buf = [0u8; 4];
                    out.extend(c.encode_utf8(&mut buf).bytes().map(Tok::Byte));
                }
            }
        }
        out
    }

    fn m(pattern: &str) -> Matcher {
        Matcher::compile(toks(pattern))
    }

    /// The obvious exponential definition, to check the fast one against.
    fn naive(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => naive(rest, s) || (!s.is_empty() && naive(p, &s[1..])),
            Some(('?', rest)) => !s.is_empty() && naive(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && naive(rest, &s[1..]),
        }
    }

    #[test]
    fn compile_picks_the_cheapest_form() {
        assert_eq!(m("*"), Matcher::Everything);
        assert_eq!(m("***"), Matcher::Everything);
        assert_eq!(m("a/b"), Matcher::Exact("a/b".into()));
        assert_eq!(m(""), Matcher::Exact("".into()));
        assert_eq!(m("a/**"), Matcher::Prefix("a/".into()));
        assert!(matches!(m("a/?"), Matcher::Glob(_)));
        assert!(matches!(m("*/a"), Matcher::Glob(_)));
    }

    #[test]
    fn star_spans_slashes_and_may_be_empty() {
        assert!(m("a/*").matches("a/"));
        assert!(m("a/*").matches("a/b/c/#"));
        assert!(m("a*b").matches("ab"));
        assert!(m("a*b").matches("a/x/b"));
        assert!(!m("a*b").matches("a/x/bc"));
        assert!(m("*b*").matches("aaba"));
    }

    #[test]
    fn question_mark_is_one_character_even_when_multibyte() {
        assert!(m("s?").matches("sé"));
        assert!(!m("s??").matches("sé"));
        assert!(m("?é?").matches("aéb"));
        assert!(m("*?").matches("é"));
        assert!(!m("?").matches(""));
    }

    #[test]
    fn mqtt_wildcards_are_plain_characters() {
        assert!(m("foo/+/bar").matches("foo/+/bar"));
        assert!(!m("foo/+/bar").matches("foo/baz/bar"));
        assert!(m("foo/#").matches("foo/#"));
        assert!(!m("foo/#").matches("foo/bar"));
    }

    fn alphabet() -> impl Strategy<Value = char> {
        prop_oneof![
            Just('a'),
            Just('/'),
            Just('*'),
            Just('?'),
            Just('+'),
            Just('#'),
            Just('é'),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn compiled_matcher_agrees_with_naive_reference(
            pattern in proptest::collection::vec(alphabet(), 0..10),
            subject in proptest::collection::vec(alphabet(), 0..12),
        ) {
            let p: String = pattern.iter().collect();
            let s: String = subject.iter().collect();
            prop_assert_eq!(m(&p).matches(&s), naive(&pattern, &subject), "pattern {:?} subject {:?}", p, s);
        }

        #[test]
        fn a_pattern_matches_itself_with_wildcards_taken_literally(
            pattern in proptest::collection::vec(alphabet(), 0..10),
        ) {
            let p: String = pattern.iter().collect();
            prop_assert!(m(&p).matches(&p));
        }
    }
}
