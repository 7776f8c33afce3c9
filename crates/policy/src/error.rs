//! [`PolicyError`]: why a policy document was refused, precisely enough to fix it.

use std::fmt;

/// A refused policy document: which statement (0-based index and `Sid`, if any), which
/// field, and what is wrong. Displayed like
/// `Statement[1] (Sid "agent"): Resource: "arn:aws:iot:*:*:topik/a" is not a client/, topic/, topicfilter/ or thing/ resource`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {}", Location(*.statement, .sid.as_deref()), .field, .message)]
pub struct PolicyError {
    /// The statement's 0-based index, or `None` for a problem with the document itself.
    pub statement: Option<usize>,
    /// The statement's `Sid`, when it has one (and the problem is inside a statement).
    pub sid: Option<String>,
    /// The field at fault: `Version`, `Statement`, `Effect`, `Action`, `Resource`, `Sid`, the
    /// name of a refused key such as `Condition`, or `document` for the JSON as a whole.
    pub field: &'static str,
    /// What is wrong, quoting the offending value.
    pub message: String,
}

impl PolicyError {
    pub(crate) fn document(field: &'static str, message: impl Into<String>) -> PolicyError {
        PolicyError {
            statement: None,
            sid: None,
            field,
            message: message.into(),
        }
    }
}

/// The `Statement[i] (Sid "x"): ` prefix, empty for document-level errors.
struct Location<'a>(Option<usize>, Option<&'a str>);

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(i), Some(sid)) => write!(f, "Statement[{i}] (Sid {sid:?}): "),
            (Some(i), None) => write!(f, "Statement[{i}]: "),
            (None, _) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_statement_sid_and_field() {
        let e = PolicyError {
            statement: Some(1),
            sid: Some("agent".into()),
            field: "Resource",
            message: "\"arn:aws:iot:*:*:topik/a\" is not a client/, topic/, topicfilter/ or thing/ resource".into(),
        };
        assert_eq!(
            e.to_string(),
            "Statement[1] (Sid \"agent\"): Resource: \"arn:aws:iot:*:*:topik/a\" is not a client/, topic/, topicfilter/ or thing/ resource"
        );
        let e = PolicyError { sid: None, ..e };
        assert!(e.to_string().starts_with("Statement[1]: Resource: "));
        assert_eq!(
            PolicyError::document("Version", "missing").to_string(),
            "Version: missing"
        );
    }
}
