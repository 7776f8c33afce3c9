//! `fleetcore job ...`: the Jobs control plane of the admin API (`/jobs`,
//! `/things/{thing}/jobs`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fleetcore_admin::models::{CancelJob, CreateJob, RolloutConfig, TimeoutConfig};
use serde_json::Value;

use super::{enc, field, list, print_out, show, table, Api, ClientOpts, Method};

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  fleetcore job create reboot-1 --target computer-a --target computer-b \\
      --document '{\"operation\":\"reboot\"}' --max-per-minute 100
  fleetcore job describe reboot-1 --follow      # a progress bar until every execution ended
  fleetcore job executions reboot-1
  fleetcore job executions --thing computer-a
  fleetcore job cancel reboot-1 --force --comment 'wrong build'

Devices get the job on $aws/things/<thing>/jobs/notify-next and run it with get,
start-next and <jobId>/update, as with AWS IoT Core (see docs/jobs.md).")]
pub struct JobArgs {
    #[command(subcommand)]
    cmd: JobCmd,
}

#[derive(Subcommand, Debug)]
enum JobCmd {
    /// Create a job: a document sent to each target thing, whose execution it tracks.
    Create {
        /// The job id: 1 to 64 of a-z A-Z 0-9 _ -.
        job: String,
        /// A target thing (a name or a thing ARN); repeat for more.
        #[arg(long = "target", value_name = "THING", required = true)]
        targets: Vec<String>,
        /// The job document, a JSON object.
        #[arg(long, value_name = "JSON", conflicts_with = "document_file")]
        document: Option<String>,
        /// The job document from a file (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        document_file: Option<PathBuf>,
        #[arg(long)]
        description: Option<String>,
        /// Create at most this many executions a minute (a rollout).
        #[arg(long, value_name = "N")]
        max_per_minute: Option<u32>,
        /// An execution IN_PROGRESS for longer than this ends TIMED_OUT.
        #[arg(long, value_name = "MINUTES")]
        timeout_minutes: Option<u64>,
    },
    /// List jobs.
    List {
        /// Only jobs in this state: IN_PROGRESS, COMPLETED or CANCELED.
        #[arg(long)]
        status: Option<String>,
    },
    /// Show a job and how many of its executions are in each state.
    Describe {
        job: String,
        /// Refresh until every execution has ended (a progress bar on a terminal).
        #[arg(long)]
        follow: bool,
    },
    /// Print a job's document.
    Document { job: String },
    /// List the executions of a job, or (--thing) of a thing.
    Executions {
        /// The job whose executions to list.
        #[arg(required_unless_present = "thing", conflicts_with = "thing")]
        job: Option<String>,
        /// List this thing's executions instead.
        #[arg(long)]
        thing: Option<String>,
    },
    /// Show one thing's execution of a job.
    Execution { thing: String, job: String },
    /// Cancel a job: its QUEUED executions, and with --force its IN_PROGRESS ones.
    Cancel {
        job: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        comment: Option<String>,
        #[arg(long)]
        reason_code: Option<String>,
    },
    /// Cancel one thing's execution of a job (--force if it is IN_PROGRESS).
    CancelExecution {
        thing: String,
        job: String,
        #[arg(long)]
        force: bool,
    },
    /// Delete a job and its executions (--force if some are IN_PROGRESS).
    Delete {
        job: String,
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn run(args: JobArgs, opts: &ClientOpts) -> Result<()> {
    let api = Api::new(opts)?;
    match args.cmd {
        JobCmd::Create {
            job,
            targets,
            document,
            document_file,
            description,
            max_per_minute,
            timeout_minutes,
        } => {
            let text = match (document, document_file) {
                (Some(d), _) => d,
                (None, Some(f)) if f.as_os_str() == "-" => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .context("cannot read the job document from stdin")?;
                    s
                }
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                (None, None) => {
                    bail!("give the job document: --document JSON or --document-file FILE")
                }
            };
            let doc: Value =
                serde_json::from_str(&text).context("the job document is not valid JSON")?;
            if !doc.is_object() {
                bail!("the job document must be a JSON object");
            }
            let body = CreateJob {
                targets,
                document: doc,
                description,
                target_selection: None,
                timeout_config: timeout_minutes.map(|m| TimeoutConfig {
                    in_progress_timeout_in_minutes: Some(m),
                }),
                job_executions_rollout_config: max_per_minute.map(|n| RolloutConfig {
                    maximum_per_minute: Some(n),
                }),
                abort_config: None,
                job_executions_retry_config: None,
            };
            let reply = api.send_model(Method::Put, &format!("/jobs/{}", enc(&job)), &body)?;
            show(opts, &reply, |v| {
                format!(
                    "created job {}; follow it with: fleetcore job describe {} --follow",
                    field(v, "jobId"),
                    field(v, "jobId")
                )
            })
        }
        JobCmd::List { status } => {
            let path = match status {
                Some(s) => format!("/jobs?status={}", enc(&s)),
                None => "/jobs".into(),
            };
            let reply = api.call(Method::Get, &path, None)?;
            show(opts, &reply, |v| {
                let rows = list(v, "jobs")
                    .iter()
                    .map(|j| {
                        vec![
                            field(j, "jobId"),
                            field(j, "status"),
                            secs(j, "createdAt"),
                            secs(j, "completedAt"),
                        ]
                    })
                    .collect();
                table(&["JOB", "STATUS", "CREATED", "COMPLETED"], rows, "no jobs")
            })
        }
        JobCmd::Describe { job, follow } => {
            let path = format!("/jobs/{}", enc(&job));
            if !follow {
                let reply = api.call(Method::Get, &path, None)?;
                return show(opts, &reply, |v| describe(&v["job"]));
            }
            let tty = std::io::stderr().is_terminal();
            let start = Instant::now();
            loop {
                let v = api.call(Method::Get, &path, None)?.json()?;
                let j = &v["job"];
                let (done, total) = progress(j);
                if tty {
                    let width = 30usize;
                    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
                    eprint!(
                        "\r[{}{}] {done}/{total} ended  {}  {:>4}s",
                        "#".repeat(filled),
                        "-".repeat(width - filled),
                        counts_inline(j),
                        start.elapsed().as_secs()
                    );
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("{done}/{total} ended  {}", counts_inline(j));
                }
                let over = j["status"] != "IN_PROGRESS" || (total > 0 && done == total);
                if over {
                    if tty {
                        eprintln!();
                    }
                    if opts.json {
                        return print_out(&format!("{v}\n"));
                    }
                    return print_out(&format!("{}\n", describe(j)));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        JobCmd::Document { job } => {
            let v = api
                .call(
                    Method::Get,
                    &format!("/jobs/{}/job-document", enc(&job)),
                    None,
                )?
                .json()?;
            let doc: Value = v["document"]
                .as_str()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or(Value::Null);
            print_out(&format!("{}\n", serde_json::to_string_pretty(&doc)?))
        }
        JobCmd::Executions { job, thing } => {
            let (path, first) = match (&job, &thing) {
                (_, Some(t)) => (format!("/things/{}/jobs", enc(t)), "jobId"),
                (Some(j), None) => (format!("/jobs/{}/things", enc(j)), "thingName"),
                (None, None) => bail!("give a job, or --thing THING"),
            };
            let reply = api.call(Method::Get, &path, None)?;
            show(opts, &reply, |v| {
                let rows = list(v, "executionSummaries")
                    .iter()
                    .map(|e| {
                        let s = &e["jobExecutionSummary"];
                        vec![
                            field(e, first),
                            field(s, "status"),
                            field(s, "versionNumber"),
                            secs(s, "queuedAt"),
                            secs(s, "lastUpdatedAt"),
                        ]
                    })
                    .collect();
                let head = if first == "jobId" { "JOB" } else { "THING" };
                table(
                    &[head, "STATUS", "VERSION", "QUEUED", "UPDATED"],
                    rows,
                    "no executions",
                )
            })
        }
        JobCmd::Execution { thing, job } => {
            let reply = api.call(
                Method::Get,
                &format!("/things/{}/jobs/{}", enc(&thing), enc(&job)),
                None,
            )?;
            show(opts, &reply, |v| execution(&v["execution"]))
        }
        JobCmd::Cancel {
            job,
            force,
            comment,
            reason_code,
        } => {
            let body = CancelJob {
                force,
                comment,
                reason_code,
            };
            let reply =
                api.send_model(Method::Put, &format!("/jobs/{}/cancel", enc(&job)), &body)?;
            show(opts, &reply, |_| {
                format!(
                    "canceled job {job}: its queued executions{} are being canceled",
                    if force { " and those in progress" } else { "" }
                )
            })
        }
        JobCmd::CancelExecution { thing, job, force } => {
            let reply = api.send_model(
                Method::Put,
                &format!("/things/{}/jobs/{}/cancel", enc(&thing), enc(&job)),
                &CancelJob {
                    force,
                    ..CancelJob::default()
                },
            )?;
            show(opts, &reply, |v| execution(&v["execution"]))
        }
        JobCmd::Delete { job, force } => {
            let path = format!(
                "/jobs/{}{}",
                enc(&job),
                if force { "?force=true" } else { "" }
            );
            let reply = api.call(Method::Delete, &path, None)?;
            show(opts, &reply, |_| {
                format!("deleted job {job} and its executions")
            })
        }
    }
}

const STATES: [(&str, &str); 8] = [
    ("numberOfQueuedThings", "QUEUED"),
    ("numberOfInProgressThings", "IN_PROGRESS"),
    ("numberOfSucceededThings", "SUCCEEDED"),
    ("numberOfFailedThings", "FAILED"),
    ("numberOfRejectedThings", "REJECTED"),
    ("numberOfTimedOutThings", "TIMED_OUT"),
    ("numberOfCanceledThings", "CANCELED"),
    ("numberOfRemovedThings", "REMOVED"),
];

fn count(j: &Value, key: &str) -> usize {
    j["jobProcessDetails"][key].as_u64().unwrap_or(0) as usize
}

/// (executions ended, targets).
fn progress(j: &Value) -> (usize, usize) {
    let total = j["targets"].as_array().map_or(0, Vec::len);
    let open = count(j, "numberOfQueuedThings") + count(j, "numberOfInProgressThings");
    let made: usize = STATES.iter().map(|(k, _)| count(j, k)).sum();
    (made - open, total)
}

fn counts_inline(j: &Value) -> String {
    STATES
        .iter()
        .filter(|(k, _)| count(j, k) > 0)
        .map(|(k, name)| format!("{name} {}", count(j, k)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_i64)
        .map(|s| super::format_ms(s * 1000))
        .unwrap_or_else(|| "-".into())
}

fn describe(j: &Value) -> String {
    let (done, total) = progress(j);
    let rows = STATES
        .iter()
        .map(|(k, name)| vec![name.to_string(), count(j, k).to_string()])
        .collect();
    format!(
        "job {} — {} — {done}/{total} executions ended\ncreated {}{}\n{}",
        field(j, "jobId"),
        field(j, "status"),
        secs(j, "createdAt"),
        match j.get("completedAt").and_then(Value::as_i64) {
            Some(_) => format!(", completed {}", secs(j, "completedAt")),
            None => String::new(),
        },
        table(&["STATE", "EXECUTIONS"], rows, "")
    )
}

fn execution(e: &Value) -> String {
    let details = e["statusDetails"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!(
        "job {} on {}: {} (version {}, execution {})\nqueued {}, updated {}{}",
        field(e, "jobId"),
        field(e, "thingName"),
        field(e, "status"),
        field(e, "versionNumber"),
        field(e, "executionNumber"),
        secs(e, "queuedAt"),
        secs(e, "lastUpdatedAt"),
        if details.is_empty() {
            String::new()
        } else {
            format!("\nstatus details: {details}")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_counts_ended_executions_against_targets() {
        let j = json!({"jobId": "j", "status": "IN_PROGRESS", "targets": ["a", "b", "c", "d"],
            "jobProcessDetails": {"numberOfQueuedThings": 1, "numberOfInProgressThings": 1,
                                  "numberOfSucceededThings": 1, "numberOfFailedThings": 0}});
        assert_eq!(progress(&j), (1, 4));
        assert_eq!(counts_inline(&j), "QUEUED 1, IN_PROGRESS 1, SUCCEEDED 1");
        assert!(describe(&j).contains("1/4 executions ended"));
    }
}
