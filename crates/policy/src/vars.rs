//! Policy variables: the names a resource may use (`${iot:ClientId}`, ...) and the values a
//! connection supplies for them ([`Vars`]).

/// How a certificate attribute is named in a policy variable
/// (`${iot:Certificate.Subject.<policy name>}`) and under which short name the broker puts
/// it in [`Vars::cert_subject`] / [`Vars::cert_issuer`]. The short names are OpenSSL's, so
/// `SN` is the surname and `serialNumber` the subject's serial number attribute.
pub const CERT_ATTRIBUTES: &[(&str, &str)] = &[
    ("CommonName", "CN"),
    ("Organization", "O"),
    ("OrganizationalUnit", "OU"),
    ("Country", "C"),
    ("State", "ST"),
    ("Locality", "L"),
    ("SerialNumber", "serialNumber"),
    ("DistinguishedNameQualifier", "dnQualifier"),
    ("Title", "title"),
    ("Surname", "SN"),
    ("GivenName", "GN"),
    ("Initials", "initials"),
    ("Pseudonym", "pseudonym"),
    ("GenerationQualifier", "generationQualifier"),
];

/// Characters a substituted value may not contain: they would turn a value chosen by the
/// client (its client id, say `+`) into a wildcard or a variable in the policy.
const FORBIDDEN_IN_VALUES: &[char] = &['*', '$', '+', '?', '#'];

/// Values for policy variables, known when a connection is authenticated. A `None` (or an
/// absent pair) means the variable has no value, and every resource using it never matches.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Vars {
    /// The MQTT client id (`${iot:ClientId}`).
    pub client_id: Option<String>,
    /// The thing's name (`${iot:Connection.Thing.ThingName}`); set by the broker only when
    /// the thing is attached to the certificate and the client id equals its name.
    pub thing_name: Option<String>,
    /// The thing's type (`${iot:Connection.Thing.ThingTypeName}`).
    pub thing_type: Option<String>,
    /// The thing's attributes (`${iot:Connection.Thing.Attributes[name]}`), as (name, value).
    pub thing_attributes: Vec<(String, String)>,
    /// Whether the thing is attached to the certificate (`${iot:Connection.Thing.IsAttached}`,
    /// substituted as `true` or `false`).
    pub thing_attached: Option<bool>,
    /// Subject attributes as (short name, value), short names as in [`CERT_ATTRIBUTES`];
    /// the first value of a repeated attribute is the one used.
    pub cert_subject: Vec<(String, String)>,
    /// Issuer attributes, like [`Vars::cert_subject`].
    pub cert_issuer: Vec<(String, String)>,
    /// The certificate's serial number (`${iot:Certificate.SerialNumber}`).
    pub cert_serial: Option<String>,
}

/// A policy variable a resource refers to, resolved from its name at parse time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Variable {
    ClientId,
    ThingName,
    ThingTypeName,
    ThingAttribute(String),
    ThingIsAttached,
    /// Holds the short name (`CN`, ...).
    Subject(&'static str),
    Issuer(&'static str),
    CertSerial,
}

/// What the text between `${` and `}` denotes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reference {
    /// `${*}`, `${?}`, `${$}`: the character itself, taken literally.
    Escape(char),
    Variable(Variable),
}

impl Variable {
    /// Resolves `${inner}`. The error says why the name is refused, for [`crate::PolicyError`].
    pub(crate) fn parse(inner: &str) -> Result<Reference, String> {
        match inner {
            "*" => return Ok(Reference::Escape('*')),
            "?" => return Ok(Reference::Escape('?')),
            "$" => return Ok(Reference::Escape('$')),
            "iot:ClientId" => return Ok(Reference::Variable(Variable::ClientId)),
            "iot:Connection.Thing.ThingName" => {
                return Ok(Reference::Variable(Variable::ThingName))
            }
            "iot:Connection.Thing.ThingTypeName" => {
                return Ok(Reference::Variable(Variable::ThingTypeName))
            }
            "iot:Connection.Thing.IsAttached" => {
                return Ok(Reference::Variable(Variable::ThingIsAttached))
            }
            "iot:Certificate.SerialNumber" => return Ok(Reference::Variable(Variable::CertSerial)),
            _ => {}
        }
        if let Some(rest) = inner.strip_prefix("iot:Connection.Thing.Attributes[") {
            return match rest.strip_suffix(']') {
                Some(name) if !name.is_empty() && !name.contains(['[', ']']) => Ok(
                    Reference::Variable(Variable::ThingAttribute(name.to_owned())),
                ),
                _ => Err(format!(
                    "${{{inner}}} is not a thing attribute variable: expected ${{iot:Connection.Thing.Attributes[name]}}"
                )),
            };
        }
        for (prefix, issuer) in [
            ("iot:Certificate.Subject.", false),
            ("iot:Certificate.Issuer.", true),
        ] {
            let Some(attr) = inner.strip_prefix(prefix) else {
                continue;
            };
            if let Some(&(_, short)) = CERT_ATTRIBUTES.iter().find(|(long, _)| *long == attr) {
                return Ok(Reference::Variable(if issuer {
                    Variable::Issuer(short)
                } else {
                    Variable::Subject(short)
                }));
            }
            if attr.starts_with("AlternativeName.") || attr.ends_with(".List") {
                return Err(format!(
                    "${{{inner}}} is not supported by fleetcore in a Resource"
                ));
            }
        }
        if inner.starts_with("aws:") || inner.starts_with("iot:Certificate.Validity.") {
            return Err(format!(
                "${{{inner}}} is not supported by fleetcore in a Resource"
            ));
        }
        Err(match suggestion(inner) {
            Some(known) => format!(
                "unknown policy variable ${{{inner}}} (variable names are case-sensitive: did you mean ${{{known}}}?)"
            ),
            None => format!("unknown policy variable ${{{inner}}}"),
        })
    }

    /// This variable's value for a connection, if it has one that is safe to substitute.
    pub(crate) fn value<'v>(&self, vars: &'v Vars) -> Option<&'v str> {
        let value = match self {
            Variable::ClientId => vars.client_id.as_deref()?,
            Variable::ThingName => vars.thing_name.as_deref()?,
            Variable::ThingTypeName => vars.thing_type.as_deref()?,
            Variable::ThingAttribute(name) => first(&vars.thing_attributes, name)?,
            Variable::ThingIsAttached => match vars.thing_attached? {
                true => "true",
                false => "false",
            },
            Variable::Subject(short) => first_short(&vars.cert_subject, short)?,
            Variable::Issuer(short) => first_short(&vars.cert_issuer, short)?,
            Variable::CertSerial => vars.cert_serial.as_deref()?,
        };
        // An empty value would silently join the text around it (`a/${x}/b` → `a//b`);
        // treating it as absent is the conservative reading.
        if value.is_empty() || value.contains(FORBIDDEN_IN_VALUES) {
            return None;
        }
        Some(value)
    }
}

fn first<'v>(pairs: &'v [(String, String)], name: &str) -> Option<&'v str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Short names are compared ignoring ASCII case: `CN` and `cn` are the same attribute in
/// every certificate tool.
fn first_short<'v>(pairs: &'v [(String, String)], short: &str) -> Option<&'v str> {
    pairs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(short))
        .map(|(_, v)| v.as_str())
}

/// A known variable name equal to `inner` but for ASCII case, for the error message.
fn suggestion(inner: &str) -> Option<String> {
    let mut known: Vec<String> = [
        "iot:ClientId",
        "iot:Connection.Thing.ThingName",
        "iot:Connection.Thing.ThingTypeName",
        "iot:Connection.Thing.IsAttached",
        "iot:Certificate.SerialNumber",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (long, _) in CERT_ATTRIBUTES {
        known.push(format!("iot:Certificate.Subject.{long}"));
        known.push(format!("iot:Certificate.Issuer.{long}"));
    }
    if let Some(i) = inner.find('[') {
        let (head, tail) = inner.split_at(i);
        if head.eq_ignore_ascii_case("iot:Connection.Thing.Attributes") {
            return Some(format!("iot:Connection.Thing.Attributes{tail}"));
        }
    }
    known.into_iter().find(|k| k.eq_ignore_ascii_case(inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(inner: &str) -> Variable {
        match Variable::parse(inner) {
            Ok(Reference::Variable(v)) => v,
            other => panic!("{inner}: {other:?}"),
        }
    }

    #[test]
    fn every_documented_variable_parses() {
        assert_eq!(var("iot:ClientId"), Variable::ClientId);
        assert_eq!(var("iot:Connection.Thing.ThingName"), Variable::ThingName);
        assert_eq!(
            var("iot:Connection.Thing.ThingTypeName"),
            Variable::ThingTypeName
        );
        assert_eq!(
            var("iot:Connection.Thing.Attributes[account]"),
            Variable::ThingAttribute("account".into())
        );
        assert_eq!(
            var("iot:Connection.Thing.IsAttached"),
            Variable::ThingIsAttached
        );
        assert_eq!(var("iot:Certificate.SerialNumber"), Variable::CertSerial);
        for (long, short) in CERT_ATTRIBUTES {
            assert_eq!(
                var(&format!("iot:Certificate.Subject.{long}")),
                Variable::Subject(short)
            );
            assert_eq!(
                var(&format!("iot:Certificate.Issuer.{long}")),
                Variable::Issuer(short)
            );
        }
        assert_eq!(Variable::parse("*"), Ok(Reference::Escape('*')));
        assert_eq!(Variable::parse("?"), Ok(Reference::Escape('?')));
        assert_eq!(Variable::parse("$"), Ok(Reference::Escape('$')));
    }

    #[test]
    fn unknown_and_unsupported_variables_are_refused_with_a_reason() {
        assert_eq!(
            Variable::parse("iot:clientid").unwrap_err(),
            "unknown policy variable ${iot:clientid} (variable names are case-sensitive: did you mean ${iot:ClientId}?)"
        );
        assert_eq!(
            Variable::parse("iot:Thing").unwrap_err(),
            "unknown policy variable ${iot:Thing}"
        );
        assert!(Variable::parse("iot:Connection.Thing.Attributes[]").is_err());
        assert!(Variable::parse("iot:Certificate.Subject.Nickname").is_err());
        assert!(Variable::parse("aws:SourceIp")
            .unwrap_err()
            .contains("not supported by fleetcore"));
        assert!(
            Variable::parse("iot:Certificate.Subject.AlternativeName.DNSName")
                .unwrap_err()
                .contains("not supported by fleetcore")
        );
    }

    #[test]
    fn values_come_from_vars_and_unsafe_ones_are_withheld() {
        let vars = Vars {
            client_id: Some("c1".into()),
            thing_attributes: vec![("a".into(), "x".into()), ("a".into(), "y".into())],
            thing_attached: Some(false),
            cert_subject: vec![("cn".into(), "dev".into()), ("CN".into(), "other".into())],
            cert_issuer: vec![("O".into(), "a+b".into())],
            ..Vars::default()
        };
        assert_eq!(Variable::ClientId.value(&vars), Some("c1"));
        assert_eq!(Variable::ThingAttribute("a".into()).value(&vars), Some("x"));
        assert_eq!(Variable::ThingIsAttached.value(&vars), Some("false"));
        assert_eq!(Variable::Subject("CN").value(&vars), Some("dev"));
        assert_eq!(Variable::Issuer("O").value(&vars), None);
        assert_eq!(Variable::ThingName.value(&vars), None);
        let empty = Vars {
            client_id: Some(String::new()),
            ..Vars::default()
        };
        assert_eq!(Variable::ClientId.value(&empty), None);
    }
}
