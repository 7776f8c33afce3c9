//! `fleetcore template ...`: fleet provisioning templates through the admin API's
//! `/provisioning-templates` (IoT Core's CreateProvisioningTemplate, List..., Describe...,
//! Update... and DeleteProvisioningTemplate).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{ArgAction, Args, Subcommand, ValueEnum};
use fleetcore_admin::models::{CreateTemplate, UpdateTemplate};
use fleetcore_services::provisioning::store::Hook;
use serde_json::Value;

use super::{details, enc, field, indent, list, read_text, show, table, Api, ClientOpts, Method};

#[derive(Args, Debug)]
#[command(after_help = "\
A provisioning template says what a device gets when it provisions itself: the thing
(name, type, attributes, groups), its certificate's state and the policy attached. A
FLEET_PROVISIONING template serves devices that connect with a claim certificate
(`fleetcore cert create --claim --template NAME`) and call RegisterThing over MQTT; a
JITP template is attached to a registered CA (`fleetcore ca set-template`) and runs when
a device with a certificate from that CA first connects. The policy a template names
must exist when a device registers, not when the template is created.

Examples:
  fleetcore template create fleet --file fleet-template.json --description \"Agents\"
  fleetcore template create agents-jitp --file jitp.json --type jitp
  fleetcore template list
  fleetcore template describe fleet
  fleetcore template update fleet --file fleet-template-v2.json
  fleetcore template update fleet --disable
  fleetcore template update fleet --hook-url https://hooks.example.com/provision
  fleetcore template delete fleet")]
pub struct TemplateArgs {
    #[command(subcommand)]
    cmd: TemplateCmd,
}

/// `--type`: what the template is for.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum Kind {
    /// FLEET_PROVISIONING: devices with a claim certificate call RegisterThing.
    Fleet,
    /// JITP: runs when a certificate from a registered CA first connects.
    Jitp,
}

impl Kind {
    fn api_name(self) -> &'static str {
        match self {
            Kind::Fleet => "FLEET_PROVISIONING",
            Kind::Jitp => "JITP",
        }
    }
}

#[derive(Subcommand, Debug)]
enum TemplateCmd {
    /// Create a provisioning template from a template file (JSON).
    ///
    /// The file is checked to be JSON here; the server checks the rest and names the
    /// resource and field at fault.
    Create {
        /// Template name: 1 to 36 of a-z A-Z 0-9 _ -
        name: String,
        /// The template body, JSON (Parameters, Resources, DeviceConfiguration...).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Free text.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Create it disabled: devices cannot provision with it until it is enabled.
        #[arg(long)]
        disabled: bool,
        /// What the template is for [default: fleet].
        #[arg(long = "type", value_name = "TYPE", ignore_case = true)]
        kind: Option<Kind>,
        /// A pre-provisioning hook: an http(s) URL that gets a POST before each
        /// registration and may refuse it.
        #[arg(long, value_name = "URL")]
        hook_url: Option<String>,
    },
    /// List every provisioning template.
    List,
    /// Show a template with its body.
    Describe {
        /// Template name.
        name: String,
    },
    /// Change a template: a new body (a new version), description, state or hook.
    ///
    /// `--description ""` removes the description.
    Update {
        /// Template name.
        name: String,
        /// A new template body, JSON: it becomes the template's next version.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The new description.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Let devices provision with it again.
        #[arg(long, action = ArgAction::SetTrue, conflicts_with = "disable")]
        enable: bool,
        /// Refuse provisioning with it until it is enabled again.
        #[arg(long, action = ArgAction::SetTrue)]
        disable: bool,
        /// Change what the template is for.
        #[arg(long = "type", value_name = "TYPE", ignore_case = true)]
        kind: Option<Kind>,
        /// Set the pre-provisioning hook (an http(s) URL).
        #[arg(long, value_name = "URL", conflicts_with = "no_hook")]
        hook_url: Option<String>,
        /// Remove the pre-provisioning hook.
        #[arg(long)]
        no_hook: bool,
    },
    /// Delete a template (refused while a CA uses it for JITP).
    Delete {
        /// Template name.
        name: String,
    },
}

pub(super) fn run(args: TemplateArgs, opts: &ClientOpts) -> Result<()> {
    match args.cmd {
        TemplateCmd::Create {
            name,
            file,
            description,
            disabled,
            kind,
            hook_url,
        } => {
            let template = read_template(&file)?;
            let api = Api::new(opts)?;
            let body = CreateTemplate {
                template_name: name,
                template_body: Value::String(template),
                description,
                enabled: disabled.then_some(false),
                template_type: kind.map(|k| k.api_name().to_string()),
                pre_provisioning_hook: hook_url.map(|url| Hook { url }),
                provisioning_role_arn: None,
            };
            let reply = api.send_model(Method::Post, "/provisioning-templates", &body)?;
            show(opts, &reply, |v| {
                let name = field(v, "templateName");
                let next = match kind.unwrap_or(Kind::Fleet) {
                    Kind::Fleet => format!(
                        "Claim certificates for it: fleetcore cert create --claim --template {name} --out DIR"
                    ),
                    Kind::Jitp => {
                        format!("Attach it to a registered CA: fleetcore ca set-template CA_ID {name}")
                    }
                };
                format!(
                    "created provisioning template {name}\n{}\n{next}",
                    details(&[
                        ("name", name.clone()),
                        ("arn", field(v, "templateArn")),
                        ("version", field(v, "defaultVersionId")),
                        ("enabled", (!disabled).to_string()),
                    ])
                )
            })
        }
        TemplateCmd::List => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Get, "/provisioning-templates", None)?;
            show(opts, &reply, templates_table)
        }
        TemplateCmd::Describe { name } => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Get, &template_path(&name), None)?;
            show(opts, &reply, |v| {
                format!("{}\n\ntemplate body:\n{}", summary(v), body_pretty(v))
            })
        }
        TemplateCmd::Update {
            name,
            file,
            description,
            enable,
            disable,
            kind,
            hook_url,
            no_hook,
        } => {
            let nothing = file.is_none()
                && description.is_none()
                && !enable
                && !disable
                && kind.is_none()
                && hook_url.is_none()
                && !no_hook;
            if nothing {
                bail!(
                    "nothing to update: give --file, --description, --enable, --disable, \
                     --type, --hook-url or --no-hook"
                );
            }
            let template_body = match file {
                Some(file) => Some(Value::String(read_template(&file)?)),
                None => None,
            };
            let body = UpdateTemplate {
                template_body,
                description,
                enabled: (enable || disable).then_some(enable),
                template_type: kind.map(|k| k.api_name().to_string()),
                pre_provisioning_hook: hook_url.map(|url| Hook { url }),
                remove_pre_provisioning_hook: no_hook,
                provisioning_role_arn: None,
            };
            let api = Api::new(opts)?;
            let reply = api.send_model(Method::Patch, &template_path(&name), &body)?;
            show(opts, &reply, |v| {
                format!(
                    "updated provisioning template {}\n{}",
                    field(v, "templateName"),
                    summary(v)
                )
            })
        }
        TemplateCmd::Delete { name } => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Delete, &template_path(&name), None)?;
            show(opts, &reply, |_| {
                format!("deleted provisioning template {name}")
            })
        }
    }
}

fn template_path(name: &str) -> String {
    format!("/provisioning-templates/{}", enc(name))
}

/// Reads a template file and checks here that it is a JSON object, naming the file,
/// line and column of a syntax error. The text goes to the server as written (IoT
/// Core's templateBody is a string holding JSON).
fn read_template(path: &Path) -> Result<String> {
    let text = read_text(path)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(_)) => Ok(text),
        Ok(other) => bail!(
            "{} is not a provisioning template: expected a JSON object \
             ({{\"Parameters\": ..., \"Resources\": ...}}), found {}",
            path.display(),
            kind_of(&other)
        ),
        Err(e) => {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let reason = full.strip_suffix(&suffix).unwrap_or(&full);
            bail!(
                "{} is not valid JSON: line {}, column {}: {reason}",
                path.display(),
                e.line(),
                e.column()
            )
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A date the API gives in seconds since the epoch (IoT Core's style), as UTC text.
fn date_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_f64)
        .map(|s| super::format_ms((s * 1000.0).round() as i64))
        .unwrap_or_else(|| "-".to_string())
}

fn hook_text(v: &Value) -> String {
    v.pointer("/preProvisioningHook/url")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| "-".to_string())
}

fn description(v: &Value) -> String {
    match v.get("description").and_then(Value::as_str) {
        Some(d) if !d.is_empty() => d.to_string(),
        _ => "-".to_string(),
    }
}

fn summary(v: &Value) -> String {
    details(&[
        ("name", field(v, "templateName")),
        ("arn", field(v, "templateArn")),
        ("type", field(v, "type")),
        ("enabled", field(v, "enabled")),
        ("description", description(v)),
        ("version", field(v, "defaultVersionId")),
        ("pre-provisioning hook", hook_text(v)),
        ("created", date_field(v, "creationDate")),
        ("modified", date_field(v, "lastModifiedDate")),
    ])
}

/// The template body, pretty-printed in the order it was written when it is JSON (it
/// is stored as given).
fn body_pretty(v: &Value) -> String {
    let text = match v.get("templateBody") {
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => reindent(s),
        Some(Value::String(s)) => s.clone(),
        Some(b) => serde_json::to_string_pretty(b).unwrap_or_default(),
        None => "-".to_string(),
    };
    indent(&text, "  ")
}

/// Lays out valid JSON text two spaces per level, one member or element a line, keeping
/// its order (a parsed `Value` would sort object keys). Strings are copied untouched.
fn reindent(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = json.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|n| n.is_whitespace()) {
                    chars.next();
                }
                // An empty object or array stays on one line.
                if chars.peek().is_some_and(|&n| n == '}' || n == ']') {
                    out.push(chars.next().unwrap_or_default());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

fn templates_table(v: &Value) -> String {
    let rows = list(v, "templates")
        .iter()
        .map(|t| {
            vec![
                field(t, "templateName"),
                field(t, "type"),
                field(t, "enabled"),
                field(t, "defaultVersionId"),
                hook_text(t),
                description(t),
            ]
        })
        .collect();
    table(
        &["NAME", "TYPE", "ENABLED", "VERSION", "HOOK", "DESCRIPTION"],
        rows,
        "no provisioning templates",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_template_file_names_the_line_and_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.json");
        std::fs::write(&path, "{\n  \"Resources\": {,\n}").expect("write");
        let e = read_template(&path).unwrap_err().to_string();
        assert!(
            e.contains("t.json is not valid JSON: line 2, column"),
            "{e}"
        );
        assert!(!e.contains(" at line "), "{e}");
        std::fs::write(&path, "[1]").expect("write");
        let e = read_template(&path).unwrap_err().to_string();
        assert!(e.contains("found an array"), "{e}");
    }

    #[test]
    fn bodies_are_laid_out_in_their_own_order() {
        let text = r#"{"b": {"z":1, "a" :[ ], "s":"x, {y}: \\\" ]"},"a":[1,{}]}"#;
        let pretty = reindent(text);
        assert_eq!(
            pretty,
            "{\n  \"b\": {\n    \"z\": 1,\n    \"a\": [],\n    \"s\": \"x, {y}: \\\\\\\" ]\"\n  },\n  \"a\": [\n    1,\n    {}\n  ]\n}"
        );
        let reparsed: Value = serde_json::from_str(&pretty).expect("still JSON");
        assert_eq!(reparsed, serde_json::from_str::<Value>(text).expect("JSON"));
    }
}
