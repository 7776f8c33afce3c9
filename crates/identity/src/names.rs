//! Name rules shared by the registry and the CA, one copy each.

/// What a thing name may be, for error messages.
pub const THING_NAME_RULE: &str = "1-128 characters of a-z A-Z 0-9 : _ -";

/// A thing name as IoT Core allows it: 1-128 characters of `[a-zA-Z0-9:_-]`. It is
/// the certificate's CN and a topic level in `$aws/things/{thing}/...`, so it can hold
/// no `/`, `+` or `#`.
pub fn is_valid_thing_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thing_names_follow_iot_core() {
        assert!(is_valid_thing_name("computer-a:01_x"));
        assert!(is_valid_thing_name(&"a".repeat(128)));
        for bad in ["", "a/b", "a+b", "a#", "a b", "é", &"a".repeat(129)] {
            assert!(!is_valid_thing_name(bad), "{bad:?}");
        }
    }
}
