//! `fleetcore group ...`: static thing groups through the admin API's `/thing-groups`
//! (IoT Core's thing group and membership APIs).

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::{
    attr_map, attrs_inline, details, enc, field, joined, list, parse_attr, print_out, show, table,
    time_field, Api, ClientOpts, Method,
};

#[derive(Args, Debug)]
#[command(after_help = "\
A static thing group holds things; groups form hierarchies (one parent, fixed at
creation, at most 7 levels, at most 100 child groups each). A thing can be in at most
10 groups, and in only one group of a hierarchy. A job targeting a group reaches the
things of the group and of every group below it.

Examples:
  fleetcore group create customer-b --description \"Customer B's agents\" --attr region=eu
  fleetcore group create customer-b-berlin --parent customer-b
  fleetcore group add customer-b-berlin computer-a computer-b
  fleetcore group members customer-b --recursive
  fleetcore group of computer-a
  fleetcore group remove customer-b-berlin computer-b
  fleetcore group delete customer-b-berlin")]
pub struct GroupArgs {
    #[command(subcommand)]
    cmd: GroupCmd,
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Create a thing group, under a parent group if given.
    ///
    /// The parent must exist and cannot be changed later.
    Create {
        /// Group name: 1 to 128 of a-z A-Z 0-9 : _ -
        name: String,
        /// The parent group (at depth 6 at most; with fewer than 100 child groups).
        #[arg(long, value_name = "GROUP")]
        parent: Option<String>,
        /// Free text, at most 2028 characters.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// An attribute, KEY=VALUE; repeat for several.
        #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
        attrs: Vec<(String, String)>,
    },
    /// List every thing group with its parent, depth, members and child groups.
    List,
    /// Show a group: its parent, path from the root, attributes, child groups, members.
    Describe {
        /// Group name.
        name: String,
    },
    /// Change a group's description or attributes (its parent cannot change).
    ///
    /// Attributes are merged into the existing ones (`--attr KEY=` removes KEY) unless
    /// --replace is given; `--description ""` removes the description.
    Update {
        /// Group name.
        name: String,
        /// The new description.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// An attribute, KEY=VALUE; repeat for several.
        #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
        attrs: Vec<(String, String)>,
        /// Replace all attributes with the --attr given (none: remove them all).
        #[arg(long)]
        replace: bool,
    },
    /// Delete a group and its memberships (refused while it has child groups).
    Delete {
        /// Group name.
        name: String,
    },
    /// Add things to a group (a thing already in it stays as it is).
    Add {
        /// Group name.
        name: String,
        /// The things to add.
        #[arg(required = true, value_name = "THING")]
        things: Vec<String>,
    },
    /// Take things out of a group.
    Remove {
        /// Group name.
        name: String,
        /// The things to take out (direct members of the group).
        #[arg(required = true, value_name = "THING")]
        things: Vec<String>,
    },
    /// List the things of a group.
    Members {
        /// Group name.
        name: String,
        /// Also the things of every group below it, each once.
        #[arg(long)]
        recursive: bool,
    },
    /// List the groups a thing is a direct member of, with each group's path.
    Of {
        /// Thing name.
        thing: String,
    },
}

pub(super) fn run(args: GroupArgs, opts: &ClientOpts) -> Result<()> {
    let api = Api::new(opts)?;
    match args.cmd {
        GroupCmd::Create {
            name,
            parent,
            description,
            attrs,
        } => {
            let mut body = json!({ "name": name });
            if let Some(p) = parent {
                body["parent"] = json!(p);
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if !attrs.is_empty() {
                body["attributes"] = Value::Object(attr_map(attrs));
            }
            let reply = api.call(Method::Post, "/thing-groups", Some(body))?;
            show(opts, &reply, |v| {
                format!(
                    "created thing group {}\n{}",
                    field(v, "name"),
                    group_details(v)
                )
            })
        }
        GroupCmd::List => {
            let reply = api.call(Method::Get, "/thing-groups", None)?;
            show(opts, &reply, groups_table)
        }
        GroupCmd::Describe { name } => {
            let reply = api.call(Method::Get, &group_path(&name), None)?;
            show(opts, &reply, group_details)
        }
        GroupCmd::Update {
            name,
            description,
            attrs,
            replace,
        } => {
            if description.is_none() && attrs.is_empty() && !replace {
                anyhow::bail!(
                    "nothing to update: give --description, --attr KEY=VALUE or --replace"
                );
            }
            let mut body = json!({ "merge": !replace });
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if replace || !attrs.is_empty() {
                body["attributes"] = Value::Object(attr_map(attrs));
            }
            let reply = api.call(Method::Patch, &group_path(&name), Some(body))?;
            show(opts, &reply, |v| {
                format!(
                    "updated thing group {}\n{}",
                    field(v, "name"),
                    group_details(v)
                )
            })
        }
        GroupCmd::Delete { name } => {
            let reply = api.call(Method::Delete, &group_path(&name), None)?;
            show(opts, &reply, |_| format!("deleted thing group {name}"))
        }
        GroupCmd::Add { name, things } => each_thing(&api, opts, Method::Put, &name, &things),
        GroupCmd::Remove { name, things } => each_thing(&api, opts, Method::Delete, &name, &things),
        GroupCmd::Members { name, recursive } => {
            let path = format!(
                "{}/things{}",
                group_path(&name),
                if recursive { "?recursive=true" } else { "" }
            );
            let reply = api.call(Method::Get, &path, None)?;
            show(opts, &reply, |v| {
                let rows = list(v, "things")
                    .iter()
                    .map(|t| vec![super::scalar(t)])
                    .collect();
                let empty = if recursive {
                    format!("no things in thing group {name} or below it")
                } else {
                    format!("no things in thing group {name}")
                };
                table(&["THING"], rows, &empty)
            })
        }
        GroupCmd::Of { thing } => {
            let path = format!("/things/{}/thing-groups", enc(&thing));
            let reply = api.call(Method::Get, &path, None)?;
            if opts.json {
                return reply.print_raw();
            }
            let v = reply.json()?;
            let mut rows = Vec::new();
            for g in list(&v, "thing_groups") {
                let g = super::scalar(g);
                // The path of each group (at most 10 of them) for the table.
                let info = api.call(Method::Get, &group_path(&g), None)?.json()?;
                rows.push(vec![g, path_text(&info)]);
            }
            let text = table(
                &["GROUP", "PATH"],
                rows,
                &format!("thing {thing} is in no thing group"),
            );
            print_out(&format!("{text}\n"))
        }
    }
}

fn group_path(name: &str) -> String {
    format!("/thing-groups/{}", enc(name))
}

/// PUT or DELETE one membership per thing, in order; stops at the first refusal,
/// saying which things were done before it.
fn each_thing(
    api: &Api,
    opts: &ClientOpts,
    method: Method,
    name: &str,
    things: &[String],
) -> Result<()> {
    let adding = matches!(method, Method::Put);
    let mut done: Vec<&str> = Vec::new();
    for thing in things {
        let path = format!("{}/things/{}", group_path(name), enc(thing));
        if let Err(e) = api.call(method, &path, None) {
            let (verb, prep) = if adding {
                ("adding", "to")
            } else {
                ("removing", "from")
            };
            let before = if done.is_empty() {
                String::new()
            } else {
                format!(" (done before it: {})", done.join(", "))
            };
            return Err(anyhow!(
                "{verb} {thing} {prep} thing group {name}{before}: {e:#}"
            ));
        }
        done.push(thing);
    }
    if opts.json {
        return Ok(());
    }
    let text = if adding {
        format!("added to thing group {name}: {}", done.join(", "))
    } else {
        format!("removed from thing group {name}: {}", done.join(", "))
    };
    print_out(&format!("{text}\n"))
}

fn path_text(v: &Value) -> String {
    let parts: Vec<String> = list(v, "path").iter().map(super::scalar).collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(" > ")
    }
}

fn groups_table(v: &Value) -> String {
    let rows = list(v, "thing_groups")
        .iter()
        .map(|g| {
            vec![
                field(g, "name"),
                field(g, "parent"),
                field(g, "depth"),
                field(g, "member_count"),
                list(g, "children").len().to_string(),
                field(g, "description"),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "PARENT",
            "DEPTH",
            "MEMBERS",
            "CHILD GROUPS",
            "DESCRIPTION",
        ],
        rows,
        "no thing groups",
    )
}

fn group_details(v: &Value) -> String {
    details(&[
        ("name", field(v, "name")),
        ("parent", field(v, "parent")),
        ("path", path_text(v)),
        ("depth", field(v, "depth")),
        ("description", field(v, "description")),
        ("attributes", attrs_inline(v)),
        ("child groups", joined(v, "children")),
        ("members", field(v, "member_count")),
        ("version", field(v, "version")),
        ("created", time_field(v, "created_ms")),
    ])
}
