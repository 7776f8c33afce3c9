//! `fleetcore group ...`: static thing groups through the admin API's `/thing-groups`
//! (IoT Core's thing group and membership APIs).

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use fleetcore_admin::models::{GroupList, GroupMembers, GroupUpdate, GroupsOfThing, NewGroup};
use fleetcore_identity::registry::GroupInfo;

use super::{
    attrs_inline, details, enc, format_ms_u, joined_list, or_dash, parse_attr, print_out, show,
    show_as, table, Api, ClientOpts, Method,
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
            let body = NewGroup {
                name,
                parent,
                description,
                attributes: attrs.into_iter().collect(),
            };
            let reply = api.send_model(Method::Post, "/thing-groups", &body)?;
            show_as(opts, &reply, |g: &GroupInfo| {
                format!("created thing group {}\n{}", g.group.name, group_details(g))
            })
        }
        GroupCmd::List => {
            let reply = api.call(Method::Get, "/thing-groups", None)?;
            show_as(opts, &reply, groups_table)
        }
        GroupCmd::Describe { name } => {
            let reply = api.call(Method::Get, &group_path(&name), None)?;
            show_as(opts, &reply, group_details)
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
            let attributes = (replace || !attrs.is_empty()).then(|| attrs.into_iter().collect());
            let body = GroupUpdate {
                description,
                attributes,
                merge: !replace,
            };
            let reply = api.send_model(Method::Patch, &group_path(&name), &body)?;
            show_as(opts, &reply, |g: &GroupInfo| {
                format!("updated thing group {}\n{}", g.group.name, group_details(g))
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
            show_as(opts, &reply, |m: &GroupMembers| {
                let rows = m.things.iter().map(|t| vec![t.clone()]).collect();
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
            let of: GroupsOfThing = reply.parse()?;
            let mut rows = Vec::new();
            for g in of.thing_groups {
                // The path of each group (at most 10 of them) for the table.
                let info: GroupInfo = api.call(Method::Get, &group_path(&g), None)?.parse()?;
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

fn path_text(g: &GroupInfo) -> String {
    if g.path.is_empty() {
        "-".to_string()
    } else {
        g.path.join(" > ")
    }
}

fn groups_table(l: &GroupList) -> String {
    let rows = l
        .thing_groups
        .iter()
        .map(|g| {
            vec![
                g.group.name.clone(),
                or_dash(g.group.parent.as_deref()),
                g.depth.to_string(),
                g.member_count.to_string(),
                g.children.len().to_string(),
                or_dash(g.group.description.as_deref()),
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

fn group_details(g: &GroupInfo) -> String {
    details(&[
        ("name", g.group.name.clone()),
        ("parent", or_dash(g.group.parent.as_deref())),
        ("path", path_text(g)),
        ("depth", g.depth.to_string()),
        ("description", or_dash(g.group.description.as_deref())),
        ("attributes", attrs_inline(&g.group.attributes)),
        ("child groups", joined_list(&g.children)),
        ("members", g.member_count.to_string()),
        ("version", g.group.version.to_string()),
        ("created", format_ms_u(g.group.created_ms)),
    ])
}
