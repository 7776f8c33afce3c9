//! Resources: ARNs read into a resource type and a [`Pattern`] over resource names, with
//! literal runs, wildcards and variable slots, then bound to a connection's [`Vars`].

use std::sync::Arc;

use crate::action::ResourceKind;
use crate::matcher::{Matcher, Tok};
use crate::vars::{Reference, Variable, Vars};

/// One entry of a statement's `Resource`.
#[derive(Clone, Debug)]
pub(crate) struct Resource {
    /// The ARN's resource type; `None` for `*`, which matches every resource of every type.
    pub(crate) kind: Option<ResourceKind>,
    pub(crate) pattern: Pattern,
}

/// A resource name pattern as written, variables not yet substituted.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    segments: Vec<Segment>,
    /// The compiled matcher when the pattern has no variables: built once at parse time and
    /// shared by every connection bound to the policy.
    fixed: Option<Arc<Matcher>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// Literal text, escapes (`${*}`, `${?}`, `${$}`) already resolved.
    Literal(String),
    /// `*`: any run of characters.
    Star,
    /// `?`: one character.
    One,
    Variable(Variable),
}

const ARN_SHAPE: &str = "arn:aws:iot:<region>:<account>:<type>/<name>";

impl Resource {
    /// Reads `*` or `arn:<partition>:iot:<region>:<account>:<type>/<name>`. Partition,
    /// region and account are accepted whatever they say (a broker has only one of each);
    /// a resource part of `*` (as in `arn:aws:iot:us-east-1:123456789012:*`) matches every
    /// resource, like a bare `*`. The error message quotes the resource.
    pub(crate) fn parse(text: &str) -> Result<Resource, String> {
        if text == "*" {
            return Ok(Resource::everything());
        }
        let Some(rest) = text.strip_prefix("arn:") else {
            return Err(format!("{text:?} is not \"*\" or an ARN like {ARN_SHAPE}"));
        };
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        if parts.len() >= 2 && parts[1] != "iot" {
            return Err(format!(
                "{text:?} is not an AWS IoT Core ARN (its service is {:?}, not \"iot\")",
                parts[1]
            ));
        }
        let resource = match parts.as_slice() {
            [_, _, _, _, resource] => *resource,
            // IAM lets a trailing `*` in a segment run across the remaining colons.
            [_, _, .., last] if last.ends_with('*') => return Ok(Resource::everything()),
            _ => return Err(format!("{text:?} is not an ARN like {ARN_SHAPE}")),
        };
        if resource == "*" {
            return Ok(Resource::everything());
        }
        let (kind, name) = resource
            .split_once('/')
            .and_then(|(t, name)| Some((ResourceKind::from_arn_type(t)?, name)))
            .ok_or_else(|| {
                format!("{text:?} is not a client/, topic/, topicfilter/ or thing/ resource")
            })?;
        if name.is_empty() {
            return Err(format!("{text:?} has nothing after the resource type"));
        }
        let pattern = Pattern::parse(name).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Resource {
            kind: Some(kind),
            pattern,
        })
    }

    fn everything() -> Resource {
        Resource {
            kind: None,
            pattern: Pattern::new(vec![Segment::Star]),
        }
    }
}

impl Pattern {
    fn new(segments: Vec<Segment>) -> Pattern {
        let fixed = if segments.iter().any(|s| matches!(s, Segment::Variable(_))) {
            None
        } else {
            tokens(&segments, &Vars::default()).map(|t| Arc::new(Matcher::compile(t)))
        };
        Pattern { segments, fixed }
    }

    /// Splits a resource name into literal runs, wildcards and variables.
    pub(crate) fn parse(name: &str) -> Result<Pattern, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = name;
        while let Some(c) = rest.chars().next() {
            if c == '*' || c == '?' {
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(if c == '*' {
                    Segment::Star
                } else {
                    Segment::One
                });
                rest = &rest[1..];
                continue;
            }
            if let Some(after) = rest.strip_prefix("${") {
                let Some(end) = after.find('}') else {
                    return Err(format!("\"${{\" at {:?} is never closed by \"}}\"", rest));
                };
                match Variable::parse(&after[..end])? {
                    Reference::Escape(c) => literal.push(c),
                    Reference::Variable(v) => {
                        if !literal.is_empty() {
                            segments.push(Segment::Literal(std::mem::take(&mut literal)));
                        }
                        segments.push(Segment::Variable(v));
                    }
                }
                rest = &after[end + 1..];
                continue;
            }
            // A `$` not starting `${` is an ordinary character, as in `$aws/things/...`.
            literal.push(c);
            rest = &rest[c.len_utf8()..];
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Pattern::new(segments))
    }

    /// The final matcher for one connection, or `None` when a variable has no value (or an
    /// unsafe one): then the resource can match nothing at all, not even its own text.
    pub(crate) fn bind(&self, vars: &Vars) -> Option<Arc<Matcher>> {
        match &self.fixed {
            Some(m) => Some(Arc::clone(m)),
            None => Some(Arc::new(Matcher::compile(tokens(&self.segments, vars)?))),
        }
    }
}

fn tokens(segments: &[Segment], vars: &Vars) -> Option<Vec<Tok>> {
    let mut toks = Vec::new();
    for s in segments {
        match s {
            Segment::Literal(l) => toks.extend(l.bytes().map(Tok::Byte)),
            Segment::Star => toks.push(Tok::Star),
            Segment::One => toks.push(Tok::One),
            Segment::Variable(v) => toks.extend(v.value(vars)?.bytes().map(Tok::Byte)),
        }
    }
    Some(toks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bound(name: &str, vars: &Vars) -> Option<Arc<Matcher>> {
        Pattern::parse(name).unwrap().bind(vars)
    }

    #[test]
    fn arns_name_their_type_and_ignore_region_and_account() {
        for (arn, kind) in [
            (
                "arn:aws:iot:us-east-1:123456789012:client/c",
                ResourceKind::Client,
            ),
            ("arn:aws:iot:*:*:topic/a/b", ResourceKind::Topic),
            (
                "arn:aws-cn:iot::*:topicfilter/a/#",
                ResourceKind::TopicFilter,
            ),
            (
                "arn:aws:iot:eu-west-1:1:thing/t/shadow",
                ResourceKind::Thing,
            ),
            ("arn:aws:iot:*:*:topic/a:b", ResourceKind::Topic),
        ] {
            assert_eq!(Resource::parse(arn).unwrap().kind, Some(kind), "{arn}");
        }
        for everything in ["*", "arn:aws:iot:*:*:*", "arn:aws:iot:us-east-1:*"] {
            let r = Resource::parse(everything).unwrap();
            assert_eq!(r.kind, None);
            assert!(r.pattern.bind(&Vars::default()).unwrap().matches("x"));
        }
    }

    #[test]
    fn malformed_resources_are_refused_with_the_text_quoted() {
        assert_eq!(
            Resource::parse("arn:aws:iot:*:*:topik/a").unwrap_err(),
            "\"arn:aws:iot:*:*:topik/a\" is not a client/, topic/, topicfilter/ or thing/ resource"
        );
        assert!(Resource::parse("arn:aws:s3:::bucket/key")
            .unwrap_err()
            .contains("not \"iot\""));
        assert!(Resource::parse("topic/a").is_err());
        assert!(Resource::parse("arn:aws:iot:us-east-1").is_err());
        assert!(Resource::parse("arn:aws:iot:*:*:topic").is_err());
        assert!(Resource::parse("arn:aws:iot:*:*:topic/").is_err());
        assert!(Resource::parse("arn:aws:iot:*:*:topic/a/${iot:ClientId")
            .unwrap_err()
            .contains("never closed"));
        assert!(Resource::parse("arn:aws:iot:*:*:topic/${iot:Nope}")
            .unwrap_err()
            .contains("unknown policy variable ${iot:Nope}"));
    }

    #[test]
    fn escapes_are_literal_characters() {
        let m = bound("a/${*}/${?}/${$}x", &Vars::default()).unwrap();
        assert!(m.matches("a/*/?/$x"));
        assert!(!m.matches("a/b/c/$x"));
        let dollar = bound("$aws/things/*", &Vars::default()).unwrap();
        assert!(dollar.matches("$aws/things/t1/shadow/get"));
    }

    #[test]
    fn variables_are_substituted_as_literals() {
        let vars = Vars {
            client_id: Some("dev-1".into()),
            ..Vars::default()
        };
        let m = bound("d/${iot:ClientId}/*", &vars).unwrap();
        assert!(m.matches("d/dev-1/x"));
        assert!(!m.matches("d/dev-2/x"));
        assert!(bound("d/${iot:Connection.Thing.ThingName}", &vars).is_none());
    }

    /// A resource written with wildcards and escapes, as the reference sees it.
    #[derive(Clone, Copy, Debug)]
    enum P {
        Char(char),
        Star,
        One,
    }

    fn naive(p: &[P], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((P::Star, rest)) => naive(rest, s) || (!s.is_empty() && naive(p, &s[1..])),
            Some((P::One, rest)) => !s.is_empty() && naive(rest, &s[1..]),
            Some((P::Char(c), rest)) => s.first() == Some(c) && naive(rest, &s[1..]),
        }
    }

    fn piece() -> impl Strategy<Value = (P, &'static str)> {
        prop_oneof![
            Just((P::Char('a'), "a")),
            Just((P::Char('/'), "/")),
            Just((P::Char('+'), "+")),
            Just((P::Char('#'), "#")),
            Just((P::Star, "*")),
            Just((P::One, "?")),
            Just((P::Char('*'), "${*}")),
            Just((P::Char('?'), "${?}")),
            Just((P::Char('$'), "${$}")),
        ]
    }

    fn subject_char() -> impl Strategy<Value = char> {
        prop_oneof![
            Just('a'),
            Just('/'),
            Just('+'),
            Just('#'),
            Just('*'),
            Just('?'),
            Just('$'),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn parsed_resources_with_escapes_agree_with_naive_reference(
            pieces in proptest::collection::vec(piece(), 1..9),
            subject in proptest::collection::vec(subject_char(), 0..10),
        ) {
            let text: String = pieces.iter().map(|(_, t)| *t).collect();
            let reference: Vec<P> = pieces.iter().map(|(p, _)| *p).collect();
            let s: String = subject.iter().collect();
            let m = bound(&text, &Vars::default()).unwrap();
            prop_assert_eq!(m.matches(&s), naive(&reference, &subject), "resource {:?} name {:?}", text, s);
        }
    }
}
