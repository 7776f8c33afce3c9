//! `fleetcore shadow get|update|delete|list`: the Device Shadow HTTP data plane of the
//! admin API (`/things/{thing}/shadow[?name=S]`, `ListNamedShadowsForThing`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use super::{enc, field, format_ms, list, scalar, show, table, Api, ClientOpts, Method};

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  fleetcore shadow get computer-a
  fleetcore shadow update computer-a --desired '{\"agent\":{\"version\":\"4.12.0\"}}'
  fleetcore shadow update computer-a --name config --reported '{\"interval\":60}'
  fleetcore shadow update computer-a --file request.json     # {\"state\":{...},\"version\":7}
  fleetcore shadow delete computer-a --name config
  fleetcore shadow list computer-a

An update from here is published to the device like one from any client: update/accepted,
update/delta (when desired and reported differ) and update/documents.")]
pub struct ShadowArgs {
    #[command(subcommand)]
    cmd: ShadowCmd,
}

#[derive(Subcommand, Debug)]
enum ShadowCmd {
    /// Show a shadow: desired, reported and delta, key by key, with its version.
    Get {
        /// The thing whose shadow it is.
        thing: String,
        /// A named shadow; without it, the thing's classic shadow.
        #[arg(long)]
        name: Option<String>,
    },
    /// Merge desired and/or reported state into a shadow (null deletes a key).
    Update {
        /// The thing whose shadow it is.
        thing: String,
        /// A named shadow; without it, the thing's classic shadow.
        #[arg(long)]
        name: Option<String>,
        /// JSON object merged into state.desired (`null` clears the section).
        #[arg(long, value_name = "JSON")]
        desired: Option<String>,
        /// JSON object merged into state.reported (`null` clears the section).
        #[arg(long, value_name = "JSON")]
        reported: Option<String>,
        /// A whole request document (`{"state":{...},"version":N}`), `-` for stdin;
        /// instead of --desired/--reported.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["desired", "reported"])]
        file: Option<PathBuf>,
        /// Only if the shadow is at this version (optimistic locking; 409 otherwise).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Delete a shadow (its version is continued if it is created again within 48 hours).
    Delete {
        /// The thing whose shadow it is.
        thing: String,
        /// A named shadow; without it, the thing's classic shadow.
        #[arg(long)]
        name: Option<String>,
    },
    /// List a thing's named shadows.
    List {
        /// The thing whose named shadows to list.
        thing: String,
        /// Names per request (1 to 100); all pages are fetched.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
}

pub(super) fn run(args: ShadowArgs, opts: &ClientOpts) -> Result<()> {
    let api = Api::new(opts)?;
    let path = |thing: &str, name: &Option<String>| match name {
        None => format!("/things/{}/shadow", enc(thing)),
        Some(n) => format!("/things/{}/shadow?name={}", enc(thing), enc(n)),
    };
    match args.cmd {
        ShadowCmd::Get { thing, name } => {
            let reply = api.call(Method::Get, &path(&thing, &name), None)?;
            show(opts, &reply, |v| describe(&thing, name.as_deref(), v))
        }
        ShadowCmd::Update {
            thing,
            name,
            desired,
            reported,
            file,
            version,
        } => {
            let mut body = match file {
                Some(f) => read_document(&f)?,
                None => {
                    if desired.is_none() && reported.is_none() {
                        bail!("nothing to update: give --desired JSON, --reported JSON or --file FILE");
                    }
                    let mut state = Map::new();
                    for (section, text) in [("desired", desired), ("reported", reported)] {
                        if let Some(t) = text {
                            let v: Value = serde_json::from_str(&t)
                                .with_context(|| format!("--{section} is not valid JSON"))?;
                            if !(v.is_object() || v.is_null()) {
                                bail!("--{section} must be a JSON object (or null to clear it)");
                            }
                            state.insert(section.to_string(), v);
                        }
                    }
                    json!({ "state": state })
                }
            };
            if let Some(v) = version {
                body["version"] = json!(v);
            }
            let reply = api.call(Method::Post, &path(&thing, &name), Some(body))?;
            show(opts, &reply, |v| {
                format!(
                    "updated the {} to version {}",
                    which(&thing, name.as_deref()),
                    field(v, "version")
                )
            })
        }
        ShadowCmd::Delete { thing, name } => {
            let reply = api.call(Method::Delete, &path(&thing, &name), None)?;
            show(opts, &reply, |v| {
                format!(
                    "deleted the {} (at version {})",
                    which(&thing, name.as_deref()),
                    field(v, "version")
                )
            })
        }
        ShadowCmd::List { thing, page_size } => {
            let mut names: Vec<Value> = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut p = format!(
                    "/api/things/shadow/ListNamedShadowsForThing/{}?pageSize={page_size}",
                    enc(&thing)
                );
                if let Some(t) = &token {
                    p += &format!("&nextToken={}", enc(t));
                }
                let page = api.call(Method::Get, &p, None)?.json()?;
                names.extend(list(&page, "results").iter().cloned());
                match page.get("nextToken").and_then(Value::as_str) {
                    Some(t) => token = Some(t.to_string()),
                    None => break,
                }
            }
            if opts.json {
                return super::print_out(&format!("{}\n", json!({ "results": names })));
            }
            let rows = names.iter().map(|n| vec![scalar(n)]).collect();
            super::print_out(&format!(
                "{}\n",
                table(
                    &["NAME"],
                    rows,
                    &format!("thing {thing} has no named shadows")
                )
            ))
        }
    }
}

fn which(thing: &str, name: Option<&str>) -> String {
    match name {
        None => format!("classic shadow of {thing}"),
        Some(n) => format!("shadow {n} of {thing}"),
    }
}

fn read_document(f: &PathBuf) -> Result<Value> {
    let text = if f.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the request document from stdin")?;
        s
    } else {
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
    };
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", f.display()))?;
    if !v.is_object() {
        bail!(
            "{} must hold a JSON object like {{\"state\":{{\"desired\":{{...}}}}}}",
            f.display()
        );
    }
    Ok(v)
}

/// Leaves of a JSON object as dotted paths.
fn leaves(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&p, v, out);
            }
        }
        _ if !prefix.is_empty() => {
            out.insert(prefix.to_string(), v.to_string());
        }
        _ => {}
    }
}

/// A shadow for people: its version and time, then one row per key.
fn describe(thing: &str, name: Option<&str>, v: &Value) -> String {
    let state = v.get("state").cloned().unwrap_or(Value::Null);
    let section = |k: &str| {
        let mut m = BTreeMap::new();
        if let Some(s) = state.get(k) {
            leaves("", s, &mut m);
        }
        m
    };
    let (desired, reported, delta) = (section("desired"), section("reported"), section("delta"));
    let mut keys: Vec<&String> = desired.keys().chain(reported.keys()).collect();
    keys.sort();
    keys.dedup();
    let rows = keys
        .into_iter()
        .map(|k| {
            vec![
                k.clone(),
                desired.get(k).cloned().unwrap_or_else(|| "-".into()),
                reported.get(k).cloned().unwrap_or_else(|| "-".into()),
                if delta.contains_key(k) { "yes" } else { "" }.to_string(),
            ]
        })
        .collect();
    let when = v
        .get("timestamp")
        .and_then(Value::as_i64)
        .map(|s| format_ms(s * 1000))
        .unwrap_or_else(|| "-".into());
    format!(
        "{} — version {}, read {when}\n{}",
        which(thing, name),
        field(v, "version"),
        table(
            &["KEY", "DESIRED", "REPORTED", "DELTA"],
            rows,
            "(empty state)"
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_is_shown_key_by_key_with_its_delta() {
        let v = json!({"state": {"desired": {"a": {"b": 1}, "c": "x"}, "reported": {"a": {"b": 2}, "d": [1]},
                       "delta": {"a": {"b": 1}, "c": "x"}}, "version": 4, "timestamp": 1});
        let text = describe("t", None, &v);
        assert!(
            text.starts_with("classic shadow of t — version 4"),
            "{text}"
        );
        let line = |k: &str| text.lines().find(|l| l.starts_with(k)).unwrap().to_string();
        assert!(
            line("a.b").contains('1') && line("a.b").contains('2') && line("a.b").ends_with("yes")
        );
        assert!(line("d ").contains("[1]"));
        assert!(!line("d ").ends_with("yes"));
    }
}
