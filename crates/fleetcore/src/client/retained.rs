//! `fleetcore retained list|get|delete`: the retained messages of a running broker,
//! through the admin API's `/retainedMessage` (IoT Core's ListRetainedMessages and
//! GetRetainedMessage, and fleetcore's DELETE).

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use fleetcore_core::encoding::b64_decode_vec;
use serde_json::{json, Value};

use super::{
    details, enc, field, format_ms, list, print_out, show, table, Api, ClientOpts, Method,
};

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  fleetcore retained list --all
  fleetcore retained get customer-b/computer-a/configurationChanges
  fleetcore retained get customer-b/computer-a/firmware --raw > firmware.bin
  fleetcore retained delete customer-b/computer-a/configurationChanges")]
pub struct RetainedArgs {
    #[command(subcommand)]
    cmd: RetainedCmd,
}

#[derive(Subcommand, Debug)]
enum RetainedCmd {
    /// List retained topics in topic order, with size, QoS and when each was retained.
    ///
    /// One page of at most --max topics; with --all, every page (following the API's
    /// nextToken). With --json the API's answer as is (with --all, every topic in one
    /// {"retainedTopics": [...]}).
    List {
        /// Topics per page, 1 to 200 [default: the server's, 50].
        #[arg(long = "max", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=200))]
        max: Option<u16>,
        /// Follow nextToken to the last page.
        #[arg(long, conflicts_with = "next_token")]
        all: bool,
        /// Start after this page token (the nextToken of an earlier `--json` page).
        #[arg(long, value_name = "TOKEN")]
        next_token: Option<String>,
    },
    /// Show the retained message of a topic: payload (as text if it is UTF-8, else
    /// base64), QoS, when it was retained, user properties.
    Get {
        /// The topic (no wildcards), slashes as they are.
        topic: String,
        /// Write only the payload's bytes to stdout, exactly as published.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
    },
    /// Delete the retained message of a topic, as MQTT does.
    ///
    /// A zero-byte retained message is published to the topic (so current subscribers
    /// receive it, as with `mosquitto_pub -r -n`); the command returns once the removal
    /// is on disk.
    Delete {
        /// The topic (no wildcards), slashes as they are.
        topic: String,
    },
}

pub(super) fn retained(args: RetainedArgs, opts: &ClientOpts) -> Result<()> {
    let api = Api::new(opts)?;
    match args.cmd {
        RetainedCmd::List {
            max,
            all,
            next_token,
        } => list_topics(&api, opts, max, all, next_token),
        RetainedCmd::Get { topic, raw } => {
            let reply = api.call(Method::Get, &message_path(&topic), None)?;
            if raw {
                let v = reply.json()?;
                let payload = decode(&v, "payload")?
                    .ok_or_else(|| anyhow!("the admin API's answer has no \"payload\""))?;
                return write_bytes(&payload);
            }
            if opts.json {
                return reply.print_raw();
            }
            let text = message_details(&reply.json()?)?;
            print_out(&format!("{text}\n"))
        }
        RetainedCmd::Delete { topic } => {
            let reply = api.call(Method::Delete, &message_path(&topic), None)?;
            show(opts, &reply, |_| {
                format!(
                    "deleted the retained message of {topic} (a zero-byte retained message \
                     was published to it)"
                )
            })
        }
    }
}

/// The whole topic is one percent-encoded segment (its slashes as %2F).
fn message_path(topic: &str) -> String {
    format!("/retainedMessage/{}", enc(topic))
}

fn list_topics(
    api: &Api,
    opts: &ClientOpts,
    max: Option<u16>,
    all: bool,
    mut token: Option<String>,
) -> Result<()> {
    let page_path = |token: &Option<String>| {
        let mut query = Vec::new();
        if let Some(n) = max {
            query.push(format!("maxResults={n}"));
        }
        if let Some(t) = token {
            query.push(format!("nextToken={}", enc(t)));
        }
        if query.is_empty() {
            "/retainedMessage".to_string()
        } else {
            format!("/retainedMessage?{}", query.join("&"))
        }
    };
    if !all {
        let reply = api.call(Method::Get, &page_path(&token), None)?;
        show(opts, &reply, |v| {
            let mut text = topics_table(list(v, "retainedTopics"));
            if let Some(next) = v.get("nextToken").and_then(Value::as_str) {
                text += &format!(
                    "\nmore topics follow: --all lists every one, --next-token {next} the next page"
                );
            }
            text
        })
    } else {
        let mut topics = Vec::new();
        loop {
            let page = api.call(Method::Get, &page_path(&token), None)?.json()?;
            topics.extend(list(&page, "retainedTopics").iter().cloned());
            match page.get("nextToken").and_then(Value::as_str) {
                Some(next) if Some(next) != token.as_deref() => token = Some(next.to_string()),
                Some(next) => bail!("the admin API returned the same nextToken twice ({next})"),
                None => break,
            }
        }
        if opts.json {
            return print_out(&format!("{}\n", json!({ "retainedTopics": topics })));
        }
        print_out(&format!("{}\n", topics_table(&topics)))
    }
}

fn topics_table(topics: &[Value]) -> String {
    let rows = topics
        .iter()
        .map(|t| {
            vec![
                field(t, "topic"),
                field(t, "qos"),
                field(t, "payloadSize"),
                modified(t),
            ]
        })
        .collect();
    table(
        &["TOPIC", "QOS", "BYTES", "LAST MODIFIED"],
        rows,
        "no retained messages",
    )
}

fn modified(v: &Value) -> String {
    match v.get("lastModifiedTime").and_then(Value::as_i64) {
        Some(ms) => format!("{} ({ms})", format_ms(ms)),
        None => "-".to_string(),
    }
}

/// A base64 field of the answer, decoded; `None` when absent or null.
fn decode(v: &Value, key: &str) -> Result<Option<Vec<u8>>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => b64_decode_vec(s.as_bytes())
            .map(Some)
            .ok_or_else(|| anyhow!("the admin API's \"{key}\" is not base64")),
        Some(other) => bail!("the admin API's \"{key}\" is not a string: {other}"),
    }
}

fn message_details(v: &Value) -> Result<String> {
    let payload = decode(v, "payload")?.unwrap_or_default();
    let props = match decode(v, "userProperties")? {
        None => "-".to_string(),
        Some(bytes) => {
            let list: Value = serde_json::from_slice(&bytes)
                .map_err(|e| anyhow!("the admin API's \"userProperties\" is not JSON: {e}"))?;
            let pairs: Vec<String> = list
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .filter_map(Value::as_object)
                .flat_map(|o| o.iter().map(|(k, v)| format!("{k}={}", super::scalar(v))))
                .collect();
            pairs.join(", ")
        }
    };
    let (label, body) = match std::str::from_utf8(&payload) {
        Ok(text) => ("payload", text.to_string()),
        Err(_) => (
            "payload (base64, not UTF-8)",
            field(v, "payload").to_string(),
        ),
    };
    Ok(format!(
        "{}\n{label}:\n{body}",
        details(&[
            ("topic", field(v, "topic")),
            ("qos", field(v, "qos")),
            ("bytes", payload.len().to_string()),
            ("last modified", modified(v)),
            ("user properties", props),
        ])
    ))
}

/// Writes bytes to stdout as they are; a closed pipe ends the output quietly.
fn write_bytes(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write output"))
        }
        _ => Ok(()),
    }
}
