//! MQTT topic names and topic filters: what is a valid one, and what matches what.
//!
//! Every topic and filter that enters the broker is checked here once, at the edge
//! (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, will messages), so the broker's router and
//! retained index can assume well-formed input and stay fast.
//!
//! The rules are those of MQTT 3.1.1 and 5 (section 4.7), plus the limits AWS IoT Core
//! puts on topics, which fleetcore keeps by default so that clients migrating from it
//! see the same behaviour: at most 256 bytes and at most 8 levels (7 slashes), the
//! level limit not applying to the reserved `$aws/` topics. Shared subscriptions
//! (`$share/{group}/{filter}`) are split into group and filter by [`parse_filter`].
//!
//! [`filter_matches`] is the reference matcher: slow, allocation-happy and obviously
//! correct. It is the specification the trie-based indexes are tested against, not
//! something to call per publish.

use std::fmt;

/// The prefix of a shared subscription: `$share/{group}/{filter}`.
const SHARE_PREFIX: &str = "$share/";

/// Topics under this prefix are exempt from the level limit (as in AWS IoT Core,
/// whose reserved topics such as `$aws/things/{name}/shadow/name/{shadow}/update/accepted`
/// are deeper than its own limit).
const AWS_PREFIX: &str = "$aws/";

/// Size limits for topic names and filters. A limit of `0` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Maximum length in bytes (UTF-8). For a shared subscription this is the whole
    /// `$share/{group}/{filter}` string. Default 256.
    pub max_len: usize,
    /// Maximum number of levels, i.e. slashes + 1. Not applied to topics and filters
    /// that start with `$aws/`. For a shared subscription it applies to the filter
    /// part only. Default 8.
    pub max_levels: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits {
            max_len: 256,
            max_levels: 8,
        }
    }
}

impl TopicLimits {
    /// No limits at all: only the MQTT syntax rules are checked.
    pub const UNLIMITED: TopicLimits = TopicLimits {
        max_len: 0,
        max_levels: 0,
    };
}

/// Why a topic name or topic filter was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// The topic or filter is the empty string.
    Empty,
    /// Longer than [`TopicLimits::max_len`].
    TooLong {
        /// Length in bytes.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// More levels than [`TopicLimits::max_levels`].
    TooManyLevels {
        /// Number of levels (slashes + 1).
        levels: usize,
        /// The limit in force.
        max: usize,
    },
    /// A topic name (what is published to) contains `+` or `#`.
    WildcardInName,
    /// Contains the character U+0000, which MQTT forbids in any string.
    NulChar,
    /// A filter with `#` that is not a whole level or not the last level, or `+` that
    /// is not a whole level (`sport/tennis#`, `sport/#/ranking`, `sport+`).
    MisplacedWildcard,
    /// A `$share/...` filter that is not `$share/{group}/{filter}` with a non-empty
    /// group free of wildcards and a non-empty filter. The text says which part is wrong.
    BadSharedSubscription(&'static str),
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty => f.write_str("topic is empty"),
            TopicError::TooLong { len, max } => {
                write!(f, "topic is {len} bytes long, the limit is {max} bytes")
            }
            TopicError::TooManyLevels { levels, max } => write!(
                f,
                "topic has {levels} levels, the limit is {max} ({} slashes)",
                max.saturating_sub(1)
            ),
            TopicError::WildcardInName => {
                f.write_str("topic name contains a wildcard ('+' or '#'), which only filters may use")
            }
            TopicError::NulChar => f.write_str("topic contains the NUL character (U+0000)"),
            TopicError::MisplacedWildcard => f.write_str(
                "misplaced wildcard: '+' must be a whole level, '#' must be a whole level and the last one",
            ),
            TopicError::BadSharedSubscription(why) => {
                write!(f, "bad shared subscription: {why}")
            }
        }
    }
}

impl std::error::Error for TopicError {}

/// Checks a topic name, the topic a message is published to.
///
/// Refuses the empty name, wildcards, NUL, and names over the limits.
pub fn validate_topic_name(name: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_common(name, limits)?;
    if name.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    check_levels(name, limits)
}

/// A subscription filter after parsing: the shared-subscription group, if the raw
/// filter was `$share/{group}/{filter}`, and the filter itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter {
    /// The share name of a shared subscription, `None` for an ordinary one.
    pub group: Option<String>,
    /// The topic filter to match topics against (without the `$share/{group}/` part).
    pub filter: String,
}

/// Checks a subscription filter as received in SUBSCRIBE and splits off the
/// shared-subscription group.
///
/// The length limit applies to `raw` as received; the level limit to the filter part.
pub fn parse_filter(raw: &str, limits: &TopicLimits) -> Result<ParsedFilter, TopicError> {
    check_common(raw, limits)?;
    let (group, filter) = match raw.strip_prefix(SHARE_PREFIX) {
        None => (None, raw),
        Some(rest) => {
            let Some((group, filter)) = rest.split_once('/') else {
                return Err(TopicError::BadSharedSubscription(
                    "expected $share/{group}/{filter}, found no filter after the group",
                ));
            };
            if group.is_empty() {
                return Err(TopicError::BadSharedSubscription("the group name is empty"));
            }
            if group.bytes().any(|b| b == b'+' || b == b'#') {
                return Err(TopicError::BadSharedSubscription(
                    "the group name contains a wildcard ('+' or '#')",
                ));
            }
            if filter.is_empty() {
                return Err(TopicError::BadSharedSubscription(
                    "the topic filter after the group is empty",
                ));
            }
            (Some(group), filter)
        }
    };
    check_wildcards(filter)?;
    check_levels(filter, limits)?;
    Ok(ParsedFilter {
        group: group.map(str::to_owned),
        filter: filter.to_owned(),
    })
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid filter, without any
/// `$share/{group}/` prefix), by the MQTT rules:
///
/// - `+` matches exactly one level, which may be empty (`sport/+` matches `sport/`);
/// - `#` matches any number of levels, including none: `sport/#` matches `sport`;
/// - a topic starting with `$` is not matched by a filter whose first level is a
///   wildcard (`#` and `+/monitor/Clients` do not match `$SYS/monitor/Clients`).
///
/// This is the reference implementation the indexes are tested against.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let filter: Vec<&str> = filter.split('/').collect();
    let topic: Vec<&str> = topic.split('/').collect();
    if topic[0].starts_with('$') && (filter[0] == "+" || filter[0] == "#") {
        return false;
    }
    for (i, f) in filter.iter().enumerate() {
        if *f == "#" {
            return true;
        }
        let Some(t) = topic.get(i) else {
            return false;
        };
        if *f != "+" && f != t {
            return false;
        }
    }
    filter.len() == topic.len()
}

fn check_common(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if limits.max_len != 0 && s.len() > limits.max_len {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: limits.max_len,
        });
    }
    if s.bytes().any(|b| b == 0) {
        return Err(TopicError::NulChar);
    }
    Ok(())
}

fn check_levels(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if limits.max_levels == 0 || s.starts_with(AWS_PREFIX) {
        return Ok(());
    }
    let levels = s.bytes().filter(|&b| b == b'/').count() + 1;
    if levels > limits.max_levels {
        return Err(TopicError::TooManyLevels {
            levels,
            max: limits.max_levels,
        });
    }
    Ok(())
}

fn check_wildcards(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if is_last => {}
            _ if level.bytes().any(|b| b == b'+' || b == b'#') => {
                return Err(TopicError::MisplacedWildcard)
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_ok(raw: &str) -> bool {
        parse_filter(raw, &TopicLimits::default()).is_ok()
    }

    fn plain(filter: &str) -> ParsedFilter {
        ParsedFilter {
            group: None,
            filter: filter.to_owned(),
        }
    }

    #[test]
    fn multi_level_wildcard_matches_parent_and_all_descendants() {
        let f = "sport/tennis/player1/#";
        assert!(filter_matches(f, "sport/tennis/player1"));
        assert!(filter_matches(f, "sport/tennis/player1/ranking"));
        assert!(filter_matches(f, "sport/tennis/player1/score/wimbledon"));
        assert!(!filter_matches(f, "sport/tennis/player2"));
        assert!(!filter_matches(f, "sport/tennis"));
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("#", "sport"));
        assert!(filter_matches("#", "/"));
        assert!(filter_matches("#", "a/b/c"));
    }

    #[test]
    fn multi_level_wildcard_must_be_whole_last_level() {
        assert!(filter_ok("#"));
        assert!(filter_ok("sport/tennis/#"));
        assert!(filter_ok("/#"));
        for bad in [
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "#/a",
            "##",
            "a/#b",
        ] {
            assert_eq!(
                parse_filter(bad, &TopicLimits::default()),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
    }

    #[test]
    fn single_level_wildcard_matches_exactly_one_level() {
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!filter_matches(
            "sport/tennis/+",
            "sport/tennis/player1/ranking"
        ));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+", "sport"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        assert!(filter_matches("+/tennis/#", "sport/tennis"));
        assert!(filter_matches("sport/+/player1", "sport/tennis/player1"));
    }

    #[test]
    fn single_level_wildcard_must_be_whole_level() {
        for good in ["+", "+/tennis/#", "sport/+/player1", "+/+", "/+", "+/"] {
            assert!(filter_ok(good), "{good}");
        }
        for bad in ["sport+", "+sport", "a/b+/c", "++"] {
            assert_eq!(
                parse_filter(bad, &TopicLimits::default()),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!filter_matches("#", "$SYS/monitor/Clients"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!filter_matches("+", "$SYS"));
        assert!(!filter_matches("+/#", "$aws/things/x/shadow/update"));
        assert!(filter_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        // Only the first level counts: '$' later in the topic is an ordinary character.
        assert!(filter_matches("+/$x", "a/$x"));
        assert!(filter_matches("#", "a/$x"));
    }

    #[test]
    fn empty_levels_are_levels() {
        assert!(filter_matches("a//b", "a//b"));
        assert!(!filter_matches("a/b", "a//b"));
        assert!(filter_matches("a/+/b", "a//b"));
        assert!(filter_matches("a/#", "a//b"));
        assert!(filter_matches("+/+", "/"));
        assert!(!filter_matches("+", "/"));
        assert!(filter_matches("a/+", "a/"));
        assert!(!filter_matches("a", "a/"));
        assert!(filter_matches("/", "/"));
        assert!(validate_topic_name("a//b", &TopicLimits::default()).is_ok());
        assert!(validate_topic_name("/", &TopicLimits::default()).is_ok());
        assert!(filter_ok("a//b"));
        assert!(filter_ok("/"));
    }

    #[test]
    fn topic_names_refuse_wildcards_nul_and_empty() {
        let l = TopicLimits::default();
        assert_eq!(validate_topic_name("", &l), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_name("a/+/b", &l),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(
            validate_topic_name("a/#", &l),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(
            validate_topic_name("a#", &l),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_topic_name("a\0b", &l), Err(TopicError::NulChar));
        assert_eq!(parse_filter("", &l), Err(TopicError::Empty));
        assert_eq!(parse_filter("a/\0", &l), Err(TopicError::NulChar));
        assert!(validate_topic_name("customer-b/computer-a/configurationChanges", &l).is_ok());
        assert!(validate_topic_name("$SYS/broker/ünïcödé", &l).is_ok());
    }

    #[test]
    fn length_limit_counts_bytes_and_zero_means_unlimited() {
        let l = TopicLimits::default();
        let at_limit = "a".repeat(256);
        assert!(validate_topic_name(&at_limit, &l).is_ok());
        let over = "a".repeat(257);
        assert_eq!(
            validate_topic_name(&over, &l),
            Err(TopicError::TooLong { len: 257, max: 256 })
        );
        assert_eq!(
            parse_filter(&over, &l),
            Err(TopicError::TooLong { len: 257, max: 256 })
        );
        // 'é' is two bytes in UTF-8: 129 of them are 258 bytes.
        let wide = "é".repeat(129);
        assert_eq!(
            validate_topic_name(&wide, &l),
            Err(TopicError::TooLong { len: 258, max: 256 })
        );
        assert!(validate_topic_name(&"a".repeat(100_000), &TopicLimits::UNLIMITED).is_ok());
    }

    #[test]
    fn level_limit_is_seven_slashes_except_under_dollar_aws() {
        let l = TopicLimits::default();
        assert!(validate_topic_name("1/2/3/4/5/6/7/8", &l).is_ok());
        assert_eq!(
            validate_topic_name("1/2/3/4/5/6/7/8/9", &l),
            Err(TopicError::TooManyLevels { levels: 9, max: 8 })
        );
        assert!(filter_ok("1/2/3/4/5/6/7/#"));
        assert_eq!(
            parse_filter("1/2/3/4/5/6/7/8/#", &l),
            Err(TopicError::TooManyLevels { levels: 9, max: 8 })
        );
        let aws = "$aws/things/thing/shadow/name/myShadow/update/documents/extra";
        assert!(validate_topic_name(aws, &l).is_ok());
        assert!(filter_ok("$aws/things/+/shadow/name/+/update/documents/#"));
        // Only the exact "$aws/" prefix is exempt.
        assert!(validate_topic_name("$awsx/2/3/4/5/6/7/8/9", &l).is_err());
        let unlimited_levels = TopicLimits {
            max_len: 0,
            max_levels: 0,
        };
        assert!(validate_topic_name(&"a/".repeat(1000), &unlimited_levels).is_ok());
    }

    #[test]
    fn shared_subscriptions_split_group_and_filter() {
        let l = TopicLimits::default();
        assert_eq!(
            parse_filter("$share/workers/jobs/+/new", &l),
            Ok(ParsedFilter {
                group: Some("workers".into()),
                filter: "jobs/+/new".into()
            })
        );
        assert_eq!(
            parse_filter("$share/g/#", &l),
            Ok(ParsedFilter {
                group: Some("g".into()),
                filter: "#".into()
            })
        );
        // The filter part may itself look like anything, including another "$share".
        assert_eq!(
            parse_filter("$share/g/$share/x", &l).map(|p| p.filter),
            Ok("$share/x".to_owned())
        );
        // Without the trailing slash, "$share" is an ordinary first level.
        assert_eq!(parse_filter("$share", &l), Ok(plain("$share")));
        assert_eq!(parse_filter("$shared/a", &l), Ok(plain("$shared/a")));
        assert_eq!(parse_filter("a/$share/b", &l), Ok(plain("a/$share/b")));
    }

    #[test]
    fn malformed_shared_subscriptions_are_refused() {
        let l = TopicLimits::default();
        for bad in [
            "$share/",
            "$share/group",
            "$share//a",
            "$share/group/",
            "$share/gr+oup/a",
            "$share/+/a",
            "$share/#/a",
            "$share/g#/a",
        ] {
            assert!(
                matches!(
                    parse_filter(bad, &l),
                    Err(TopicError::BadSharedSubscription(_))
                ),
                "{bad}: {:?}",
                parse_filter(bad, &l)
            );
        }
        assert_eq!(
            parse_filter("$share/g/a/b#", &l),
            Err(TopicError::MisplacedWildcard)
        );
        // The level limit applies to the filter, not to the "$share/{group}/" prefix.
        assert!(parse_filter("$share/g/1/2/3/4/5/6/7/8", &l).is_ok());
        assert_eq!(
            parse_filter("$share/g/1/2/3/4/5/6/7/8/9", &l),
            Err(TopicError::TooManyLevels { levels: 9, max: 8 })
        );
    }

    #[test]
    fn errors_read_as_sentences() {
        assert_eq!(
            TopicError::TooLong { len: 300, max: 256 }.to_string(),
            "topic is 300 bytes long, the limit is 256 bytes"
        );
        assert_eq!(
            TopicError::TooManyLevels { levels: 9, max: 8 }.to_string(),
            "topic has 9 levels, the limit is 8 (7 slashes)"
        );
        assert_eq!(
            TopicError::BadSharedSubscription("the group name is empty").to_string(),
            "bad shared subscription: the group name is empty"
        );
        let e: Box<dyn std::error::Error> = Box::new(TopicError::Empty);
        assert_eq!(e.to_string(), "topic is empty");
    }
}
