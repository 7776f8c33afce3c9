//! The operator commands: `fleetcore thing|group|cert|policy|ca|token|template|shadow|job|retained ...`
//! (`group`, `template`, `shadow`, `job` and `retained` in their own modules).
//!
//! Every command except `ca init` is one or two calls to the admin API of a running
//! `fleetcore serve` (see `docs/admin-api.md`): it finds the API and its token from the
//! client options ([`ClientOpts`]), sends the request, and prints the answer as a table
//! for people or, with `--json`, the API's JSON exactly as it came. `ca init` works on
//! local files only, so a CA can exist before the server first starts.
//!
//! Failures end in one line on stderr (`fleetcore: thing "x" not found (404)`) and a
//! non-zero exit status.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use fleetcore_admin::models::{
    CaList, CaTemplate, CaView, CertDetail, CertFromCsr, CertList, CertView, CreateCert,
    DefaultVersion, ErrorBody, IssuedCert, IssuedTokenView, NewCa, NewClaimCert, NewPolicy,
    NewPolicyVersion, NewThing, NewToken, PolicyList, RegisterCert, StateChange, ThingDetail,
    ThingList, ThingUpdate, TokenKeyList, TokenKeyView,
};
use fleetcore_identity::ca::{Ca, CaFiles};
use fleetcore_identity::registry::{PolicyRecord, Thing};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

mod group;
mod job;
mod retained;
mod shadow;
mod template;

/// Where the admin API is and how to authenticate. Flattened into `fleetcore` itself
/// with `global = true`, so each option can go before the subcommand
/// (`fleetcore --admin-url URL thing list`) or anywhere after it
/// (`fleetcore thing list --admin-url URL`). `serve` takes only `--data-dir` of these.
#[derive(Args, Debug, Clone)]
#[command(
    next_help_heading = "Admin API options (thing, group, cert, policy, ca, token, template, shadow, job, retained)"
)]
pub struct ClientOpts {
    /// Base URL of the admin API of a running `fleetcore serve`.
    #[arg(
        long,
        global = true,
        env = "FLEETCORE_ADMIN_URL",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    admin_url: String,
    /// Bearer token for the admin API. Without it the token is read from
    /// <DATA_DIR>/admin.token, which the server writes at first start.
    #[arg(
        long,
        global = true,
        env = "FLEETCORE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// admin URL
    /// [default: <DATA_DIR>/pki/ca.pem].
    #[arg(
        long,
        global = true,
        env = "FLEETCORE_ADMIN_CACERT",
        value_name = "FILE"
    )]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) for an https:// admin URL, e.g. admin.cert.pem from
    /// `fleetcore ca admin-cert`; with it no token is needed (nor read from admin.token).
    #[arg(
        long,
        global = true,
        env = "FLEETCORE_ADMIN_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(
        long,
        global = true,
        env = "FLEETCORE_ADMIN_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// The server's data directory. For the admin commands: where admin.token is read
    /// from, and where `ca init` puts pki/ [default: ./data]. For `serve`: overrides
    /// `data_dir` of the configuration.
    #[arg(long, global = true, env = "FLEETCORE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print the API's JSON answer as is instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

impl ClientOpts {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.json
    }

    /// `--data-dir` as given (or FLEETCORE_DATA_DIR), for `serve` to override its
    /// configuration with.
    pub fn data_dir_override(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// The data directory the admin commands use: `--data-dir`, else `./data`.
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./data"))
    }
}

/// The operator subcommands, flattened into `fleetcore`'s own list.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Manage things: the devices and agents of the fleet.
    Thing(ThingArgs),
    /// Manage static thing groups (hierarchies of things) and their members.
    Group(group::GroupArgs),
    /// Issue, register, inspect, revoke and delete device certificates.
    Cert(CertArgs),
    /// Manage IoT Core policies and attach them to certificates.
    Policy(PolicyArgs),
    /// Create the local CA; register your own CAs; fetch the revocation list.
    Ca(CaArgs),
    /// Issue short-lived device tokens (an MQTT password) and manage their signing keys.
    Token(TokenArgs),
    /// Manage fleet provisioning templates (devices register themselves with them).
    Template(template::TemplateArgs),
    /// Read, update and delete Device Shadows (classic and named).
    Shadow(shadow::ShadowArgs),
    /// Send jobs to things and follow their executions.
    Job(job::JobArgs),
    /// List, show and delete retained messages (IoT Core's retained-message APIs).
    Retained(retained::RetainedArgs),
}

#[derive(Args, Debug)]
pub struct ThingArgs {
    #[command(subcommand)]
    cmd: ThingCmd,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  fleetcore cert create --thing computer-a --policy agent --out ./certs
  fleetcore cert sign --csr computer-a.csr --thing computer-a --out computer-a.cert.pem
  fleetcore cert revoke 3f1c...e9")]
pub struct CertArgs {
    #[command(subcommand)]
    cmd: CertCmd,
}

#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    cmd: PolicyCmd,
}

#[derive(Args, Debug)]
pub struct CaArgs {
    #[command(subcommand)]
    cmd: CaCmd,
}

#[derive(Args, Debug)]
#[command(after_help = "\
A token lets a device connect without a client certificate (behind a TLS-inspecting
proxy, or from a browser): MQTT user name = the thing name, password = the token. It
grants what the policies of the certificate it stands for allow, until it expires or
that certificate leaves ACTIVE or is detached from the thing.

Examples:
  TOKEN=$(fleetcore token issue --thing computer-a --ttl 1h)
  mosquitto_sub -h HOST -p PORT --cafile ca.pem -i computer-a -u computer-a -P \"$TOKEN\" -t 'customer-b/computer-a/#'
  fleetcore token keys
  fleetcore token rotate-key")]
pub struct TokenArgs {
    #[command(subcommand)]
    cmd: TokenCmd,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Issue a token for a thing; prints only the token.
    ///
    /// The token alone goes to stdout, so `TOKEN=$(fleetcore token issue --thing NAME)`
    /// works; what it stands for and when it expires go to stderr (all of it on stdout
    /// with --json). The thing needs an ACTIVE certificate attached: the token grants
    /// what that certificate's policies allow, until it expires or the certificate
    /// leaves ACTIVE or is detached from the thing.
    Issue {
        /// The thing the token is for: the MQTT user name to connect with.
        #[arg(long, value_name = "NAME")]
        thing: String,
        /// Lifetime: a whole number followed by s, m, h or d (90s, 30m, 1h, 2d), or
        /// seconds; at most the server's [tokens] max_ttl_secs (24h unless configured)
        /// [default: the server's [tokens] default_ttl_secs, 1h unless configured].
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl_arg)]
        ttl: Option<String>,
        /// The certificate the token stands for, ACTIVE and attached to the thing
        /// [default: the thing's most recently created ACTIVE certificate].
        #[arg(long = "cert", value_name = "CERT_ID")]
        cert: Option<String>,
    },
    /// List the token signing keys: the one that signs, and retired ones still accepted.
    Keys,
    /// Make a new signing key now.
    ///
    /// New tokens are signed with it; tokens signed by earlier keys stay valid until
    /// they expire. The server also does this by itself at the first issue after the
    /// key is [tokens] key_rotation_secs old (7 days unless configured).
    RotateKey,
}

/// `--ttl`: checked here so a typo fails before anything is sent; the server gets the
/// text as written.
fn parse_ttl_arg(text: &str) -> Result<String, String> {
    fleetcore_admin::api::parse_ttl(text).map(|_| text.trim().to_string())
}

/// `--type` and `--attr` of `thing create` and `thing update`.
#[derive(Args, Debug)]
struct ThingFields {
    /// The thing type (free text, e.g. "agent").
    #[arg(long = "type", value_name = "TYPE")]
    thing_type: Option<String>,
    /// An attribute, KEY=VALUE; repeat for several.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    attrs: Vec<(String, String)>,
}

#[derive(Subcommand, Debug)]
enum ThingCmd {
    /// Create a thing.
    Create {
        /// Thing name: 1 to 128 of a-z A-Z 0-9 : _ -
        name: String,
        #[command(flatten)]
        fields: ThingFields,
    },
    /// List every thing.
    List,
    /// Show a thing and the certificates attached to it.
    Describe {
        /// Thing name.
        name: String,
    },
    /// Change a thing's type or attributes.
    ///
    /// Attributes are merged into the existing ones (`--attr KEY=` removes KEY) unless
    /// --replace is given.
    Update {
        /// Thing name.
        name: String,
        #[command(flatten)]
        fields: ThingFields,
        /// Replace all attributes with the --attr given (none: remove them all).
        #[arg(long)]
        replace: bool,
    },
    /// Delete a thing (refused while certificates are attached to it).
    Delete {
        /// Thing name.
        name: String,
    },
    /// Attach a certificate to a thing: clients with that certificate are that thing.
    Attach {
        /// Thing name.
        name: String,
        /// Certificate id (SHA-256 of the certificate, hex).
        #[arg(long = "cert", value_name = "CERT_ID")]
        cert: String,
    },
    /// Detach a certificate from a thing.
    Detach {
        /// Thing name.
        name: String,
        /// Certificate id (SHA-256 of the certificate, hex).
        #[arg(long = "cert", value_name = "CERT_ID")]
        cert: String,
    },
}

/// `--policy`, `--days` and `--state` of the commands that make or register a certificate.
#[derive(Args, Debug)]
struct IssueOpts {
    /// Attach this policy to the certificate; repeat for several.
    #[arg(long = "policy", value_name = "POLICY")]
    policies: Vec<String>,
    /// State of the new certificate (ACTIVE unless the server is told otherwise).
    #[arg(long, value_name = "STATE", ignore_case = true, value_parser = state_parser())]
    state: Option<String>,
}

#[derive(Subcommand, Debug)]
enum CertCmd {
    /// Issue a certificate with a new private key for a thing (or a claim certificate
    /// for a provisioning template), written to a directory.
    ///
    /// Writes DIR/NAME.cert.pem, DIR/NAME.private.key (mode 0600) and DIR/ca.pem, and
    /// prints the certificate id. The server never keeps the key. Existing files are
    /// never replaced (an identical ca.pem is left as it is).
    ///
    /// With --claim --template T it writes DIR/claim-T.cert.pem and
    /// DIR/claim-T.private.key instead: a claim certificate (CN claim-T, ACTIVE, no
    /// thing) with the policy fleetcore-claim-T, which allows only T's fleet
    /// provisioning topics. Devices connect with it to get their own certificate and
    /// thing (CreateKeysAndCertificate or CreateCertificateFromCsr, then RegisterThing).
    #[command(after_help = "\
Examples:
  fleetcore cert create --thing computer-a --policy agent --out ./certs
  fleetcore cert create --claim --template fleet --out ./claim --days 30")]
    Create {
        /// The thing the certificate is for (its CN); created if missing, and the
        /// certificate is attached to it. Required unless --claim.
        #[arg(long, value_name = "NAME", required_unless_present = "claim")]
        thing: Option<String>,
        /// Issue a claim certificate for the fleet provisioning template --template
        /// (instead of a certificate for --thing).
        #[arg(
            long,
            requires = "template",
            conflicts_with_all = ["thing", "policies", "state"]
        )]
        claim: bool,
        /// With --claim: the FLEET_PROVISIONING template the claim certificate is for.
        #[arg(long, value_name = "TEMPLATE", requires = "claim")]
        template: Option<String>,
        /// Directory to write the files into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[command(flatten)]
        issue: IssueOpts,
        /// Validity in days (the server's default when not given).
        #[arg(long, value_name = "N")]
        days: Option<u32>,
    },
    /// Issue a certificate for a certificate signing request (the key stays on the device).
    Sign {
        /// The CSR, PEM.
        #[arg(long, value_name = "FILE")]
        csr: PathBuf,
        /// The thing the certificate is for (its CN; without it, the CSR's CN). Created
        /// if missing, and the certificate is attached to it.
        #[arg(long, value_name = "NAME")]
        thing: Option<String>,
        #[command(flatten)]
        issue: IssueOpts,
        /// Validity in days (the server's default when not given).
        #[arg(long, value_name = "N")]
        days: Option<u32>,
        /// Write the certificate to FILE (never replaced) instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Register a certificate issued elsewhere.
    ///
    /// It must chain to the fleetcore CA or to a CA added with `fleetcore ca register`.
    Register {
        /// The certificate, PEM.
        #[arg(long, value_name = "FILE")]
        pem: PathBuf,
        /// Attach the certificate to this thing.
        #[arg(long, value_name = "NAME")]
        thing: Option<String>,
        #[command(flatten)]
        issue: IssueOpts,
    },
    /// List every certificate.
    List,
    /// Show a certificate with its state, things and policies.
    Describe {
        /// Certificate id.
        id: String,
    },
    /// Change a certificate's state.
    ///
    /// Leaving ACTIVE disconnects its live connections at once; REVOKED is final.
    SetState {
        /// Certificate id.
        id: String,
        /// The new state.
        #[arg(ignore_case = true, value_parser = state_parser())]
        state: String,
    },
    /// Revoke a certificate: set-state REVOKED.
    ///
    /// Its live connections are closed at once, it can never be reactivated, and it
    /// appears in the CRL.
    Revoke {
        /// Certificate id.
        id: String,
    },
    /// Delete a certificate (refused while it is ACTIVE or attached).
    Delete {
        /// Certificate id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Create a policy from an IoT Core policy document (JSON).
    Create {
        /// Policy name.
        name: String,
        /// The policy document, JSON.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// List every policy.
    List,
    /// Show a policy with every version's document.
    Get {
        /// Policy name.
        name: String,
    },
    /// Add a new version of a policy.
    Version {
        /// Policy name.
        name: String,
        /// The policy document, JSON.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Make the new version the one in force.
        #[arg(long)]
        default: bool,
    },
    /// Make a version the one in force.
    SetDefault {
        /// Policy name.
        name: String,
        /// Version number.
        version: u32,
    },
    /// Delete a policy (refused while attached).
    Delete {
        /// Policy name.
        name: String,
    },
    /// Attach a policy to a certificate.
    Attach {
        /// Policy name.
        name: String,
        /// Certificate id.
        #[arg(long = "cert", value_name = "CERT_ID")]
        cert: String,
    },
    /// Detach a policy from a certificate.
    Detach {
        /// Policy name.
        name: String,
        /// Certificate id.
        #[arg(long = "cert", value_name = "CERT_ID")]
        cert: String,
    },
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create the fleetcore CA and a server certificate (local files, no server needed).
    ///
    /// Writes ca.pem, ca.key, server.pem and server.key (keys mode 0600). Refuses to
    /// replace them unless --force.
    Init {
        /// Directory for the files [default: <DATA_DIR>/pki].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// A DNS name or IP address of the server; repeat for several; the first is the
        /// server certificate's CN [default: localhost, 127.0.0.1].
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Replace existing files: a new CA invalidates every certificate it issued.
        #[arg(long)]
        force: bool,
    },
    /// Replace the server certificate with one for other names (local files, offline).
    ///
    /// Writes a new <DIR>/server.pem and server.key (mode 0600), signed by the CA in the
    /// same directory, for the names given: the DNS names and IP addresses clients
    /// connect to (the first is the CN). The CA and every device certificate stay
    /// valid; devices need nothing new. Restart `fleetcore serve` afterwards: TLS
    /// listeners and the admin API read the certificate at start. Set [pki]
    /// server_names in the configuration to the same names, for a PKI created later.
    #[command(after_help = "\
Example:
  fleetcore ca reissue-server --data-dir /var/lib/fleetcore --san broker.example.com --san 10.0.0.5")]
    ReissueServer {
        /// Directory of the CA and the server files [default: <DATA_DIR>/pki].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// A DNS name or IP address of the server; repeat for several; the first is the
        /// certificate's CN. At least one.
        #[arg(
            long = "san",
            visible_alias = "name",
            value_name = "NAME",
            required = true
        )]
        sans: Vec<String>,
    },
    /// Issue an admin client certificate with the local CA (no server needed).
    ///
    /// Writes DIR/admin.cert.pem and DIR/admin.private.key (mode 0600), signed by the CA
    /// in <DATA_DIR>/pki. With `[admin] tls = true`, a client presenting it (CN
    /// fleetcore-admin unless `[admin] client_cert_cn` says otherwise) needs no token:
    /// `fleetcore --admin-url https://HOST:PORT --client-cert DIR/admin.cert.pem
    /// --client-key DIR/admin.private.key thing list`. Existing files are never replaced.
    AdminCert {
        /// Directory to write the files into (created if missing, mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Directory of the CA [default: <DATA_DIR>/pki].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The certificate's subject CN: the server's `[admin] client_cert_cn`.
        #[arg(long, value_name = "NAME", default_value = "fleetcore-admin")]
        cn: String,
        /// Validity in days.
        #[arg(long, value_name = "N", default_value_t = 365)]
        days: u32,
    },
    /// Register your own CA: certificates it signed can then be registered.
    Register {
        /// The CA certificate, PEM.
        #[arg(long, value_name = "FILE")]
        pem: PathBuf,
    },
    /// List the CAs: the fleetcore CA first, then registered ones, with JITP templates.
    List,
    /// Attach a JITP provisioning template to a registered CA.
    ///
    /// A device whose certificate that CA signed, and which is not registered yet, is
    /// then registered at its first connection as the template says (thing, policy,
    /// certificate state); see `fleetcore template --help`.
    #[command(after_help = "\
Example:
  fleetcore template create agents-jitp --file jitp.json --type jitp
  fleetcore ca set-template 5d2a...c1 agents-jitp")]
    SetTemplate {
        /// The registered CA's id (`fleetcore ca list`).
        ca_id: String,
        /// A JITP template (`fleetcore template create NAME --type jitp`).
        template: String,
    },
    /// Detach the JITP template of a registered CA: certificates it signed that are not
    /// registered are then refused at CONNECT.
    ClearTemplate {
        /// The registered CA's id.
        ca_id: String,
    },
    /// Fetch the certificate revocation list.
    Crl {
        /// Write the CRL to FILE (replaced atomically), DER unless --pem. Without it the
        /// CRL is printed as PEM.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// With --out: write PEM instead of DER.
        #[arg(long)]
        pem: bool,
    },
}

const STATES: [&str; 4] = ["ACTIVE", "INACTIVE", "REVOKED", "PENDING_ACTIVATION"];

fn state_parser() -> impl TypedValueParser<Value = String> {
    PossibleValuesParser::new(STATES).map(|s| s.to_ascii_uppercase())
}

fn parse_attr(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// Runs one operator command; prints its output, or one error line, and says how it went.
pub fn run(cmd: ClientCommand, opts: &ClientOpts) -> ExitCode {
    match dispatch(cmd, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetcore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: ClientCommand, opts: &ClientOpts) -> Result<()> {
    match cmd {
        ClientCommand::Thing(a) => thing(a.cmd, opts),
        ClientCommand::Group(a) => group::run(a, opts),
        ClientCommand::Cert(a) => cert(a.cmd, opts),
        ClientCommand::Policy(a) => policy(a.cmd, opts),
        ClientCommand::Ca(a) => ca(a.cmd, opts),
        ClientCommand::Token(a) => token_cmd(a.cmd, opts),
        ClientCommand::Template(a) => template::run(a, opts),
        ClientCommand::Shadow(a) => shadow::run(a, opts),
        ClientCommand::Job(a) => job::run(a, opts),
        ClientCommand::Retained(a) => retained::retained(a, opts),
    }
}

// ---------------------------------------------------------------------------------------
// thing
// ---------------------------------------------------------------------------------------

fn thing(cmd: ThingCmd, opts: &ClientOpts) -> Result<()> {
    let api = Api::new(opts)?;
    match cmd {
        ThingCmd::Create { name, fields } => {
            let body = NewThing {
                name,
                thing_type: fields.thing_type,
                attributes: fields.attrs.into_iter().collect(),
            };
            let reply = api.send_model(Method::Post, "/things", &body)?;
            show_as(opts, &reply, |t: &Thing| {
                format!("created thing {}\n{}", t.name, thing_details(t, None))
            })
        }
        ThingCmd::List => {
            let reply = api.call(Method::Get, "/things", None)?;
            show_as(opts, &reply, |l: &ThingList| {
                let rows = l
                    .things
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            or_dash(t.thing_type.as_deref()),
                            attrs_inline(&t.attributes),
                            t.version.to_string(),
                            format_ms_u(t.created_ms),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "TYPE", "ATTRIBUTES", "VERSION", "CREATED"],
                    rows,
                    "no things",
                )
            })
        }
        ThingCmd::Describe { name } => {
            let reply = api.call(Method::Get, &format!("/things/{}", enc(&name)), None)?;
            show_as(opts, &reply, |d: &ThingDetail| {
                thing_details(&d.thing, Some(&d.principals))
            })
        }
        ThingCmd::Update {
            name,
            fields,
            replace,
        } => {
            if fields.thing_type.is_none() && fields.attrs.is_empty() && !replace {
                bail!("nothing to update: give --type, --attr KEY=VALUE or --replace");
            }
            let attributes =
                (replace || !fields.attrs.is_empty()).then(|| fields.attrs.into_iter().collect());
            let body = ThingUpdate {
                thing_type: fields.thing_type,
                attributes,
                merge: !replace,
            };
            let path = format!("/things/{}", enc(&name));
            let reply = api.send_model(Method::Patch, &path, &body)?;
            show_as(opts, &reply, |t: &Thing| {
                format!("updated thing {}\n{}", t.name, thing_details(t, None))
            })
        }
        ThingCmd::Delete { name } => {
            let reply = api.call(Method::Delete, &format!("/things/{}", enc(&name)), None)?;
            show(opts, &reply, |_| format!("deleted thing {name}"))
        }
        ThingCmd::Attach { name, cert } => {
            let path = format!("/things/{}/principals/{}", enc(&name), enc(&cert));
            let reply = api.call(Method::Put, &path, None)?;
            show(opts, &reply, |_| {
                format!("attached certificate {cert} to thing {name}")
            })
        }
        ThingCmd::Detach { name, cert } => {
            let path = format!("/things/{}/principals/{}", enc(&name), enc(&cert));
            let reply = api.call(Method::Delete, &path, None)?;
            show(opts, &reply, |_| {
                format!("detached certificate {cert} from thing {name}")
            })
        }
    }
}

fn attrs_inline(attributes: &std::collections::BTreeMap<String, String>) -> String {
    if attributes.is_empty() {
        return "-".to_string();
    }
    attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn thing_details(t: &Thing, principals: Option<&[String]>) -> String {
    let mut rows = vec![
        ("name", t.name.clone()),
        ("type", or_dash(t.thing_type.as_deref())),
        ("attributes", attrs_inline(&t.attributes)),
        ("version", t.version.to_string()),
        ("created", format_ms_u(t.created_ms)),
    ];
    if let Some(p) = principals {
        rows.push(("certificates", joined_list(p)));
    }
    details(&rows)
}

// ---------------------------------------------------------------------------------------
// cert
// ---------------------------------------------------------------------------------------

fn cert(cmd: CertCmd, opts: &ClientOpts) -> Result<()> {
    match cmd {
        // clap holds --template to --claim, and --claim away from --thing and --policy.
        CertCmd::Create {
            template: Some(template),
            out,
            days,
            ..
        } => claim_create(opts, &template, out, days),
        CertCmd::Create {
            thing,
            out,
            issue,
            days,
            ..
        } => {
            let thing = thing.ok_or_else(|| anyhow!("--thing NAME is required (or --claim)"))?;
            cert_create(opts, thing, out, issue, days)
        }
        CertCmd::Sign {
            csr,
            thing,
            issue,
            days,
            out,
        } => cert_sign(opts, csr, thing, issue, days, out),
        CertCmd::Register { pem, thing, issue } => {
            let body = RegisterCert {
                certificate_pem: read_text(&pem)?,
                state: issue.state,
                thing,
                policies: issue.policies,
            };
            let api = Api::new(opts)?;
            let reply = api.send_model(Method::Post, "/certificates/register", &body)?;
            show_as(opts, &reply, |c: &CertView| {
                format!("registered certificate\n{}", cert_details(c, None))
            })
        }
        CertCmd::List => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Get, "/certificates", None)?;
            show_as(opts, &reply, |l: &CertList| {
                let rows = l
                    .certificates
                    .iter()
                    .map(|c| {
                        vec![
                            c.id.clone(),
                            c.state.to_string(),
                            or_dash(c.subject_cn.as_deref()),
                            format_ms_u(c.not_after_ms),
                        ]
                    })
                    .collect();
                table(&["ID", "STATE", "CN", "NOT AFTER"], rows, "no certificates")
            })
        }
        CertCmd::Describe { id } => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Get, &format!("/certificates/{}", enc(&id)), None)?;
            show_as(opts, &reply, |d: &CertDetail| {
                cert_details(&d.cert, Some((&d.things, &d.policies)))
            })
        }
        CertCmd::SetState { id, state } => set_state(opts, &id, &state),
        CertCmd::Revoke { id } => set_state(opts, &id, "REVOKED"),
        CertCmd::Delete { id } => {
            let api = Api::new(opts)?;
            let path = format!("/certificates/{}", enc(&id));
            let reply = api.call(Method::Delete, &path, None)?;
            show(opts, &reply, |_| format!("deleted certificate {id}"))
        }
    }
}

fn set_state(opts: &ClientOpts, id: &str, state: &str) -> Result<()> {
    let api = Api::new(opts)?;
    let path = format!("/certificates/{}/state", enc(id));
    let body = StateChange {
        state: state.to_string(),
    };
    let reply = api.send_model(Method::Put, &path, &body)?;
    show_as(opts, &reply, |c: &CertView| {
        let head = match state {
            "REVOKED" => format!("revoked certificate {id}; its live connections were closed"),
            "ACTIVE" => format!("certificate {id} is ACTIVE"),
            _ => format!("certificate {id} is {state}; its live connections were closed"),
        };
        format!("{head}\n{}", cert_details(c, None))
    })
}

/// A certificate's rows; with `attached`, the things and policies it is attached to.
fn cert_details(c: &CertView, attached: Option<(&[String], &[String])>) -> String {
    let mut rows = vec![
        ("id", c.id.clone()),
        ("state", c.state.to_string()),
        ("subject", c.subject.clone()),
        ("issuer", c.issuer.clone()),
        ("serial", c.serial.clone()),
        ("not after", format_ms_u(c.not_after_ms)),
        ("created", format_ms_u(c.created_ms)),
        ("updated", format_ms_u(c.updated_ms)),
    ];
    if let Some(revoked) = c.revoked_ms {
        rows.push(("revoked", format_ms_u(revoked)));
    }
    if let Some((things, policies)) = attached {
        rows.push(("things", joined_list(things)));
        rows.push(("policies", joined_list(policies)));
    }
    details(&rows)
}

/// The three files `cert create` writes.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl CertFiles {
    /// DIR/STEM.cert.pem, DIR/STEM.private.key and DIR/ca.pem.
    fn in_dir(out: &Path, stem: &str) -> CertFiles {
        CertFiles {
            cert: out.join(format!("{stem}.cert.pem")),
            key: out.join(format!("{stem}.private.key")),
            ca: out.join("ca.pem"),
        }
    }

    /// Refuses when the certificate or key file exists, then makes DIR (mode 0700).
    /// Called before asking for a certificate, so a refusal leaves nothing behind.
    fn prepare(&self, out: &Path) -> Result<()> {
        for path in [&self.cert, &self.key] {
            if path.symlink_metadata().is_ok() {
                bail!(
                    "{} already exists; refusing to overwrite it (remove it or choose another --out)",
                    path.display()
                );
            }
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .with_context(|| format!("cannot create {}", out.display()))
    }

    /// Writes the key (0600), the certificate and ca.pem of an issued certificate, none
    /// over an existing file. Says whether ca.pem was written (false: an identical one
    /// was there already).
    fn write(&self, issued: &IssuedCert) -> Result<bool> {
        let key = issued
            .private_key_pem
            .as_deref()
            .ok_or_else(|| anyhow!("the admin API's answer has no \"private_key_pem\""))?;
        write_new(&self.key, key.as_bytes(), 0o600)?;
        write_new(&self.cert, issued.certificate_pem.as_bytes(), 0o644)?;
        let ca_pem = issued.ca_pem.as_str();
        // Several devices' files may share one directory and its ca.pem.
        match fs::read(&self.ca) {
            Ok(existing) if existing == ca_pem.as_bytes() => Ok(false),
            Ok(_) => bail!(
                "{} exists and holds a different CA certificate; it was not replaced",
                self.ca.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_new(&self.ca, ca_pem.as_bytes(), 0o644)?;
                Ok(true)
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.ca.display())),
        }
    }

    /// The `--json` output: the certificate id and the files.
    fn json(&self, id: &str) -> Value {
        json!({
            "certificate_id": id,
            "certificate_file": self.cert,
            "private_key_file": self.key,
            "ca_file": self.ca,
        })
    }

    /// The `label: file` rows of the human output.
    fn rows(&self, ca_written: bool) -> Vec<(&'static str, String)> {
        let ca_note = if ca_written { "" } else { " (unchanged)" };
        vec![
            ("certificate", self.cert.display().to_string()),
            (
                "private key",
                format!(
                    "{} (mode 0600; the only copy, the server does not keep it)",
                    self.key.display()
                ),
            ),
            ("CA", format!("{}{ca_note}", self.ca.display())),
        ]
    }
}

fn cert_create(
    opts: &ClientOpts,
    thing: String,
    out: PathBuf,
    issue: IssueOpts,
    days: Option<u32>,
) -> Result<()> {
    // The thing name becomes a file name: hold it to IoT Core's rules before it can
    // reach outside DIR.
    let name_ok = (1..=128).contains(&thing.len())
        && thing
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if !name_ok {
        bail!(
            "invalid thing name {thing:?}: 1 to 128 characters from a-z, A-Z, 0-9, ':', '_', '-'"
        );
    }
    let files = CertFiles::in_dir(&out, &thing);
    files.prepare(&out)?;
    let api = Api::new(opts)?;

    let body = CreateCert {
        thing: thing.clone(),
        policies: issue.policies,
        state: issue.state,
        days,
    };
    let reply = api.send_model(Method::Post, "/certificates/create", &body)?;
    let issued: IssuedCert = reply.parse()?;
    let id = issued.certificate_id.clone();
    let written = files.write(&issued).with_context(|| {
        format!(
            "certificate {id} was issued for thing {thing} but its files were not all written \
             (revoke it with `fleetcore cert revoke {id}` if it is not needed)"
        )
    })?;

    if opts.json {
        return print_out(&format!("{}\n", files.json(&id)));
    }
    print_out(&format!(
        "issued certificate {id} for thing {thing}\n{}\n",
        details(&files.rows(written))
    ))
}

/// `cert create --claim --template T`: a claim certificate for a fleet provisioning
/// template, written as DIR/claim-T.cert.pem, DIR/claim-T.private.key and DIR/ca.pem.
fn claim_create(opts: &ClientOpts, template: &str, out: PathBuf, days: Option<u32>) -> Result<()> {
    // The template name becomes part of a file name: IoT Core's rule keeps it in DIR.
    let name_ok = (1..=36).contains(&template.len())
        && template
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if !name_ok {
        bail!(
            "invalid template name {template:?}: 1 to 36 characters from a-z, A-Z, 0-9, '_', '-'"
        );
    }
    let files = CertFiles::in_dir(&out, &format!("claim-{template}"));
    files.prepare(&out)?;
    let api = Api::new(opts)?;

    let path = format!(
        "/provisioning-templates/{}/claim-certificates",
        enc(template)
    );
    let reply = api.send_model(Method::Post, &path, &NewClaimCert { days })?;
    let v = reply.json()?;
    // A claim certificate is an issued certificate plus the template's policy.
    let issued: IssuedCert = reply.parse()?;
    let id = issued.certificate_id.clone();
    let policy = field(&v, "policy_name");
    let written = files.write(&issued).with_context(|| {
        format!(
            "claim certificate {id} was issued for template {template} but its files were not \
             all written (revoke it with `fleetcore cert revoke {id}` if it is not needed)"
        )
    })?;

    if opts.json {
        let mut out = files.json(&id);
        out["policy_name"] = json!(policy);
        out["template_name"] = json!(template);
        return print_out(&format!("{out}\n"));
    }
    let mut rows = vec![(
        "policy",
        format!("{policy} (only the template's provisioning topics)"),
    )];
    rows.extend(files.rows(written));
    print_out(&format!(
        "issued claim certificate {id} for provisioning template {template}\n{}\n\
         Devices connect with it, then call CreateKeysAndCertificate (or \
         CreateCertificateFromCsr) and RegisterThing to get their own certificate and thing.\n",
        details(&rows)
    ))
}

fn cert_sign(
    opts: &ClientOpts,
    csr: PathBuf,
    thing: Option<String>,
    issue: IssueOpts,
    days: Option<u32>,
    out: Option<PathBuf>,
) -> Result<()> {
    let csr_pem = read_text(&csr)?;
    if let Some(out) = &out {
        if out.symlink_metadata().is_ok() {
            bail!("{} already exists; refusing to overwrite it", out.display());
        }
    }
    let api = Api::new(opts)?;
    let body = CertFromCsr {
        csr_pem,
        thing,
        policies: issue.policies,
        state: issue.state,
        days,
    };
    let reply = api.send_model(Method::Post, "/certificates/from-csr", &body)?;
    let issued: IssuedCert = reply.parse()?;
    let id = &issued.certificate_id;
    let pem = &issued.certificate_pem;
    if let Some(out) = &out {
        write_new(out, pem.as_bytes(), 0o644)
            .with_context(|| format!("certificate {id} was issued but could not be written"))?;
    }
    if opts.json {
        return reply.print_raw();
    }
    match out {
        Some(out) => print_out(&format!(
            "issued certificate {id}, written to {}\n",
            out.display()
        )),
        None => {
            // The PEM alone on stdout, so it can be redirected into a file.
            eprintln!("certificate id: {id}");
            print_out(pem)
        }
    }
}

// ---------------------------------------------------------------------------------------
// policy
// ---------------------------------------------------------------------------------------

fn policy(cmd: PolicyCmd, opts: &ClientOpts) -> Result<()> {
    match cmd {
        PolicyCmd::Create { name, file } => {
            let document = read_policy(&file)?;
            let api = Api::new(opts)?;
            let body = NewPolicy { name, document };
            let reply = api.send_model(Method::Post, "/policies", &body)?;
            show_as(opts, &reply, |p: &PolicyRecord| {
                format!("created policy {}\n{}", p.name, policy_summary(p))
            })
        }
        PolicyCmd::List => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Get, "/policies", None)?;
            show_as(opts, &reply, |l: &PolicyList| {
                let rows = l
                    .policies
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            p.default_version.to_string(),
                            version_list(p, ","),
                            format_ms_u(p.created_ms),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "DEFAULT VERSION", "VERSIONS", "CREATED"],
                    rows,
                    "no policies",
                )
            })
        }
        PolicyCmd::Get { name } => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Get, &format!("/policies/{}", enc(&name)), None)?;
            show_as(opts, &reply, policy_full)
        }
        PolicyCmd::Version {
            name,
            file,
            default,
        } => {
            let document = read_policy(&file)?;
            let api = Api::new(opts)?;
            let path = format!("/policies/{}/versions", enc(&name));
            let body = NewPolicyVersion {
                document,
                set_as_default: default,
            };
            let reply = api.send_model(Method::Post, &path, &body)?;
            show_as(opts, &reply, |p: &PolicyRecord| {
                let newest = p.versions.keys().next_back().copied().unwrap_or_default();
                format!(
                    "added version {newest} to policy {}\n{}",
                    p.name,
                    policy_summary(p)
                )
            })
        }
        PolicyCmd::SetDefault { name, version } => {
            let api = Api::new(opts)?;
            let path = format!("/policies/{}/default-version", enc(&name));
            let reply = api.send_model(Method::Put, &path, &DefaultVersion { version })?;
            show_as(opts, &reply, |p: &PolicyRecord| {
                format!(
                    "version {version} of policy {name} is now in force\n{}",
                    policy_summary(p)
                )
            })
        }
        PolicyCmd::Delete { name } => {
            let api = Api::new(opts)?;
            let path = format!("/policies/{}", enc(&name));
            let reply = api.call(Method::Delete, &path, None)?;
            show(opts, &reply, |_| format!("deleted policy {name}"))
        }
        PolicyCmd::Attach { name, cert } => {
            let api = Api::new(opts)?;
            let path = format!("/policies/{}/targets/{}", enc(&name), enc(&cert));
            let reply = api.call(Method::Put, &path, None)?;
            show(opts, &reply, |_| {
                format!("attached policy {name} to certificate {cert}")
            })
        }
        PolicyCmd::Detach { name, cert } => {
            let api = Api::new(opts)?;
            let path = format!("/policies/{}/targets/{}", enc(&name), enc(&cert));
            let reply = api.call(Method::Delete, &path, None)?;
            show(opts, &reply, |_| {
                format!("detached policy {name} from certificate {cert}")
            })
        }
    }
}

/// Reads a policy document and checks locally that it is JSON; the server checks the rest.
fn read_policy(path: &Path) -> Result<Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON policy document", path.display()))
}

/// The version numbers of a policy, ascending, joined by `sep`.
fn version_list(p: &PolicyRecord, sep: &str) -> String {
    p.versions
        .keys()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

fn policy_summary(p: &PolicyRecord) -> String {
    details(&[
        ("name", p.name.clone()),
        ("default version", p.default_version.to_string()),
        ("versions", version_list(p, ", ")),
        ("created", format_ms_u(p.created_ms)),
    ])
}

fn policy_full(p: &PolicyRecord) -> String {
    let mut text = policy_summary(p);
    for (n, version) in &p.versions {
        let mark = if *n == p.default_version {
            ", in force"
        } else {
            ""
        };
        text += &format!(
            "\n\nversion {n} ({}{mark}):\n",
            format_ms_u(version.created_ms)
        );
        // A document stored as text is shown parsed when it is JSON.
        let document = serde_json::from_str::<Value>(&version.document)
            .ok()
            .and_then(|d| serde_json::to_string_pretty(&d).ok())
            .unwrap_or_else(|| version.document.clone());
        text += &indent(&document, "  ");
    }
    text
}

// ---------------------------------------------------------------------------------------
// ca
// ---------------------------------------------------------------------------------------

fn ca(cmd: CaCmd, opts: &ClientOpts) -> Result<()> {
    match cmd {
        CaCmd::Init { dir, sans, force } => {
            let dir = dir.unwrap_or_else(|| opts.data_dir().join("pki"));
            let sans = if sans.is_empty() {
                vec!["localhost".to_string(), "127.0.0.1".to_string()]
            } else {
                sans
            };
            let files = CaFiles::in_dir(&dir);
            let ca = Ca::init(&files, &sans, force)?;
            if opts.json {
                let out = json!({
                    "ca_id": ca.ca_info().id,
                    "ca_cert": files.ca_cert,
                    "ca_key": files.ca_key,
                    "server_cert": files.server_cert,
                    "server_key": files.server_key,
                    "server_names": sans,
                });
                return print_out(&format!("{out}\n"));
            }
            print_out(&format!(
                "created the fleetcore CA (id {}) and a server certificate for {}\n{}\n\
                 Devices must trust ca.pem; TLS listeners present server.pem. \
                 Keep ca.key secret.\n",
                ca.ca_info().id,
                sans.join(", "),
                details(&[
                    ("CA certificate", files.ca_cert.display().to_string()),
                    ("CA key", format!("{} (mode 0600)", files.ca_key.display())),
                    (
                        "server certificate",
                        files.server_cert.display().to_string()
                    ),
                    (
                        "server key",
                        format!("{} (mode 0600)", files.server_key.display())
                    ),
                ])
            ))
        }
        CaCmd::ReissueServer { dir, sans } => {
            let dir = dir.unwrap_or_else(|| opts.data_dir().join("pki"));
            let files = CaFiles::in_dir(&dir);
            let ca = Ca::load(&files)?;
            let info = ca.reissue_server(&files, &sans)?;
            if opts.json {
                let out = json!({
                    "certificate_id": info.id,
                    "server_cert": files.server_cert,
                    "server_key": files.server_key,
                    "server_names": sans,
                    "not_after_ms": ms_since_epoch(info.not_after),
                });
                return print_out(&format!("{out}\n"));
            }
            print_out(&format!(
                "issued a new server certificate for {} (signed by the CA in {})\n{}\n\
                 Restart fleetcore serve to present it. Devices keep trusting ca.pem.\n",
                sans.join(", "),
                dir.display(),
                details(&[
                    (
                        "server certificate",
                        files.server_cert.display().to_string()
                    ),
                    (
                        "server key",
                        format!("{} (mode 0600)", files.server_key.display())
                    ),
                ])
            ))
        }
        CaCmd::AdminCert { out, dir, cn, days } => admin_cert(opts, out, dir, &cn, days),
        CaCmd::Register { pem } => {
            let body = NewCa {
                certificate_pem: read_text(&pem)?,
            };
            let api = Api::new(opts)?;
            let reply = api.send_model(Method::Post, "/cas", &body)?;
            show_as(opts, &reply, |c: &CaView| {
                format!("registered CA\n{}", ca_details(c))
            })
        }
        CaCmd::List => {
            let api = Api::new(opts)?;
            let reply = api.call(Method::Get, "/cas", None)?;
            if opts.json {
                return reply.print_raw();
            }
            let l: CaList = reply.parse()?;
            let mut rows = Vec::new();
            for c in l.cas {
                let id = c.id;
                // The JITP template of each CA (a handful of CAs at most).
                let path = format!("/cas/{}/provisioning-template", enc(&id));
                let template = match api.get_if_found(&path)? {
                    Some(r) => field(&r.json()?, "templateName"),
                    None => "-".to_string(),
                };
                rows.push(vec![id, c.subject, format_ms_u(c.created_ms), template]);
            }
            let text = table(
                &["ID", "SUBJECT", "CREATED", "JITP TEMPLATE"],
                rows,
                "no CAs",
            );
            print_out(&format!("{text}\n"))
        }
        CaCmd::SetTemplate { ca_id, template } => {
            let api = Api::new(opts)?;
            let path = format!("/cas/{}/provisioning-template", enc(&ca_id));
            let body = CaTemplate {
                template_name: template.clone(),
            };
            let reply = api.send_model(Method::Put, &path, &body)?;
            show(opts, &reply, |_| {
                format!("CA {ca_id} now provisions its new devices with JITP template {template}")
            })
        }
        CaCmd::ClearTemplate { ca_id } => {
            let api = Api::new(opts)?;
            let path = format!("/cas/{}/provisioning-template", enc(&ca_id));
            let reply = api.call(Method::Delete, &path, None)?;
            show(opts, &reply, |_| {
                format!("CA {ca_id} has no JITP template now")
            })
        }
        CaCmd::Crl { out, pem } => {
            let api = Api::new(opts)?;
            let as_pem = pem || out.is_none();
            let path = if as_pem { "/crl?format=pem" } else { "/crl" };
            let reply = api.call(Method::Get, path, None)?;
            match out {
                None => print_out(&String::from_utf8_lossy(&reply.body)),
                Some(out) => {
                    write_replace(&out, &reply.body)?;
                    let format = if as_pem { "PEM" } else { "DER" };
                    if opts.json {
                        let v = json!({ "file": out, "format": format, "bytes": reply.body.len() });
                        print_out(&format!("{v}\n"))
                    } else {
                        print_out(&format!(
                            "wrote the CRL ({format}, {} bytes) to {}\n",
                            reply.body.len(),
                            out.display()
                        ))
                    }
                }
            }
        }
    }
}

fn ms_since_epoch(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ca admin-cert`: a client certificate for the admin API, from the local CA.
fn admin_cert(
    opts: &ClientOpts,
    out: PathBuf,
    dir: Option<PathBuf>,
    cn: &str,
    days: u32,
) -> Result<()> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let dir = dir.unwrap_or_else(|| opts.data_dir().join("pki"));
    let cert_file = out.join("admin.cert.pem");
    let key_file = out.join("admin.private.key");
    for path in [&cert_file, &key_file] {
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; refusing to overwrite it (remove it or choose another --out)",
                path.display()
            );
        }
    }
    let ca = Ca::load(&CaFiles::in_dir(&dir))
        .with_context(|| format!("cannot load the CA in {}", dir.display()))?;
    let (issued, key_pem) = ca.create_keys_and_certificate(cn, days)?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    write_new(&key_file, key_pem.as_bytes(), 0o600)?;
    write_new(&cert_file, issued.pem.as_bytes(), 0o644)?;
    if opts.json {
        let v = json!({
            "certificate_id": issued.id,
            "subject_cn": issued.subject_cn,
            "certificate_file": cert_file,
            "private_key_file": key_file,
        });
        return print_out(&format!("{v}\n"));
    }
    print_out(&format!(
        "issued admin client certificate {} (CN {cn}, {days} days)\n{}\n\
         With [admin] tls = true it opens the admin API without the token; keep the key \
         as safe as admin.token.\n",
        issued.id,
        details(&[
            ("certificate", cert_file.display().to_string()),
            ("private key", format!("{} (mode 0600)", key_file.display())),
        ])
    ))
}

fn ca_details(c: &CaView) -> String {
    details(&[
        ("id", c.id.clone()),
        ("subject", c.subject.clone()),
        ("created", format_ms_u(c.created_ms)),
    ])
}

// ---------------------------------------------------------------------------------------
// token
// ---------------------------------------------------------------------------------------

fn token_cmd(cmd: TokenCmd, opts: &ClientOpts) -> Result<()> {
    let api = Api::new(opts)?;
    match cmd {
        TokenCmd::Issue { thing, ttl, cert } => {
            let body = NewToken {
                thing,
                ttl: ttl.map(Value::String),
                ttl_secs: None,
                certificate_id: cert,
            };
            let reply = api.send_model(Method::Post, "/tokens", &body)?;
            if opts.json {
                return reply.print_raw();
            }
            let t: IssuedTokenView = reply.parse()?;
            // The token alone on stdout, so it can be captured.
            eprintln!(
                "token for thing {} (certificate {}, key {}), expires {}",
                t.thing, t.certificate_id, t.key_id, t.expires_at,
            );
            print_out(&format!("{}\n", t.token))
        }
        TokenCmd::Keys => {
            let reply = api.call(Method::Get, "/tokens/keys", None)?;
            show_as(opts, &reply, token_keys_table)
        }
        TokenCmd::RotateKey => {
            let reply = api.call(Method::Post, "/tokens/keys/rotate", None)?;
            if opts.json {
                return reply.print_raw();
            }
            let key: TokenKeyView = reply.parse()?;
            let keys: TokenKeyList = api.call(Method::Get, "/tokens/keys", None)?.parse()?;
            print_out(&format!(
                "new signing key {} (created {}); tokens signed by earlier keys stay valid \
                 until they expire\n{}\n",
                key.key_id,
                format_ms_u(key.created_ms),
                token_keys_table(&keys)
            ))
        }
    }
}

fn token_keys_table(l: &TokenKeyList) -> String {
    let rows = l
        .keys
        .iter()
        .map(|k| {
            let status = if k.signing {
                "signing".to_string()
            } else {
                let until = k
                    .verify_until_ms
                    .map_or_else(|| "-".to_string(), format_ms_u);
                format!("retired, verifies until {until}")
            };
            vec![k.key_id.clone(), format_ms_u(k.created_ms), status]
        })
        .collect();
    table(
        &["KEY ID", "CREATED", "STATUS"],
        rows,
        "no token keys yet (the first `fleetcore token issue` makes one)",
    )
}

// ---------------------------------------------------------------------------------------
// The admin API
// ---------------------------------------------------------------------------------------

/// How long a connection to the admin API may take to open, and a whole request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The most the CLI reads of one answer (the largest are certificate lists and CRLs).
const MAX_BODY: u64 = 256 * 1024 * 1024;

#[derive(Clone, Copy, Debug)]
enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// A connection to one admin API with its token.
struct Api {
    base: String,
    /// `Bearer <token>`; `None` when a client certificate stands in for the token.
    authorization: Option<String>,
    agent: ureq::Agent,
}

/// A successful answer.
struct Reply {
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).context("the admin API answered with invalid JSON")
    }

    /// The body as one of the API's answer models.
    fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            let name = std::any::type_name::<T>();
            let name = name.rsplit("::").next().unwrap_or(name);
            format!("the admin API's answer is not the {name} this fleetcore expects")
        })
    }

    /// Prints the body as it came (`--json`); an empty answer (204) prints nothing.
    fn print_raw(&self) -> Result<()> {
        if self.body.is_empty() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&self.body).into_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        print_out(&text)
    }
}

impl Api {
    fn new(opts: &ClientOpts) -> Result<Api> {
        let base = opts.admin_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!(
                "invalid --admin-url {:?}: expected http://HOST:PORT or https://HOST:PORT",
                opts.admin_url
            );
        }
        // A client certificate replaces the token, unless one is given explicitly too.
        let token = match (&opts.client_cert, &opts.token) {
            (Some(_), None) => None,
            _ => Some(token(opts)?),
        };
        let tls = tls_config(opts, base.starts_with("https://"))?;
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            // The admin API is normally on loopback: an HTTP_PROXY meant for the
            // internet must not capture it.
            .proxy(None)
            .user_agent(concat!("fleetcore-cli/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Api {
            base,
            authorization: token.map(|t| format!("Bearer {t}")),
            agent: ureq::Agent::new_with_config(config),
        })
    }

    /// Sends one request; any answer but 2xx becomes an error naming the API's message.
    fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Reply> {
        let (status, body) = self.send(method, path, body)?;
        if (200..300).contains(&status) {
            Ok(Reply { body })
        } else {
            Err(anyhow!(api_error_message(status, &body)))
        }
    }

    /// Sends one of the API's request models as the JSON body.
    fn send_model<B: Serialize>(&self, method: Method, path: &str, body: &B) -> Result<Reply> {
        let body = serde_json::to_value(body).context("cannot encode the request")?;
        self.call(method, path, Some(body))
    }

    /// A GET where 404 means "none" rather than a failure.
    fn get_if_found(&self, path: &str) -> Result<Option<Reply>> {
        match self.send(Method::Get, path, None)? {
            (404, _) => Ok(None),
            (status, body) if (200..300).contains(&status) => Ok(Some(Reply { body })),
            (status, body) => Err(anyhow!(api_error_message(status, &body))),
        }
    }

    /// Sends one request; the status and body of whatever answer came.
    fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let auth = self.authorization.as_deref();
        let sent = match method {
            Method::Get => with_auth(self.agent.get(&url), auth).call(),
            Method::Delete => with_auth(self.agent.delete(&url), auth).call(),
            Method::Post | Method::Put | Method::Patch => {
                let builder = match method {
                    Method::Post => self.agent.post(&url),
                    Method::Put => self.agent.put(&url),
                    _ => self.agent.patch(&url),
                };
                let builder = with_auth(builder, auth);
                match body {
                    Some(body) => builder.send_json(&body),
                    None => builder.send_empty(),
                }
            }
        };
        let mut response = sent.map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| self.transport_error(e))?;
        Ok((status, body))
    }

    fn transport_error(&self, e: ureq::Error) -> anyhow::Error {
        let reason = match &e {
            ureq::Error::Io(io) => match io.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                io::ErrorKind::ConnectionReset => "connection reset".to_string(),
                io::ErrorKind::TimedOut => "timed out".to_string(),
                _ => io.to_string(),
            },
            ureq::Error::Timeout(t) => format!("no answer in time ({t})"),
            ureq::Error::HostNotFound => "host not found".to_string(),
            ureq::Error::BadUri(u) => format!("invalid URL {u}"),
            other => other.to_string(),
        };
        if let Some(hint) = scheme_mismatch(&self.base, &e, &reason) {
            return anyhow!("cannot talk to the admin API at {}: {hint}", self.base);
        }
        anyhow!(
            "cannot reach the admin API at {}: {reason} — is fleetcore serve running?",
            self.base
        )
    }
}

/// Says which scheme to use when the failure shows the URL's scheme is the wrong one:
/// TLS to a plain-HTTP server fails as a "corrupt message" (an HTTP answer is no TLS
/// record); plain HTTP to a TLS server gets no HTTP answer (the connection is closed or
/// an alert arrives).
fn scheme_mismatch(base: &str, e: &ureq::Error, reason: &str) -> Option<String> {
    let text = format!("{reason} {e:?}").to_ascii_lowercase();
    if let Some(rest) = base.strip_prefix("https://") {
        let plain = text.contains("corrupt message")
            || text.contains("invalidcontenttype")
            || text.contains("invalid content type");
        return plain.then(|| {
            format!(
                "the server answered in plain HTTP, not TLS — use http://{rest} \
                 (the admin API serves HTTPS only with [admin] tls = true)"
            )
        });
    }
    let rest = base.strip_prefix("http://")?;
    let not_http = matches!(e, ureq::Error::Protocol(_))
        || text.contains("unexpected eof")
        || text.contains("connection reset")
        || text.contains("connection closed")
        || text.contains("parse");
    not_http.then(|| {
        format!(
            "no HTTP answer ({reason}) — if the server has [admin] tls = true, use https://{rest}"
        )
    })
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: Option<&str>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

/// Reads every certificate in a PEM file.
fn read_pem_certs(path: &Path, what: &str) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let pem = fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) =
            item.with_context(|| format!("{} is not valid PEM", path.display()))?
        {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        bail!("{} holds no certificate ({what})", path.display());
    }
    Ok(certs)
}

/// TLS for an https:// admin URL: trust --cacert (or <data-dir>/pki/ca.pem) and present
/// --client-cert/--client-key when given.
fn tls_config(opts: &ClientOpts, https: bool) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{ClientCert, PrivateKey, RootCerts, TlsConfig};
    let builder = TlsConfig::builder();
    if !https {
        if opts.client_cert.is_some() {
            bail!("--client-cert needs an https:// admin URL (the server's [admin] tls = true)");
        }
        return Ok(builder.build());
    }
    let cacert = opts
        .cacert
        .clone()
        .unwrap_or_else(|| opts.data_dir().join("pki").join("ca.pem"));
    let roots = read_pem_certs(&cacert, "the CA certificate").with_context(|| {
        "an https:// admin URL needs the CA that signed the server's certificate: \
         --cacert FILE or FLEETCORE_ADMIN_CACERT (default <data-dir>/pki/ca.pem)"
    })?;
    let mut builder = builder.root_certs(RootCerts::new_with_certs(&roots));
    if let (Some(cert), Some(key)) = (&opts.client_cert, &opts.client_key) {
        let chain = read_pem_certs(cert, "the client certificate")?;
        let key_pem =
            fs::read(key).with_context(|| format!("cannot read the key {}", key.display()))?;
        let key = PrivateKey::from_pem(&key_pem)
            .with_context(|| format!("{} holds no private key", key.display()))?;
        builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(builder.build())
}

/// One line for a non-2xx answer: the API's own message when it sent one.
fn api_error_message(status: u16, body: &[u8]) -> String {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => Some(e.error.message),
        // Not the API's own error shape (a proxy's, say): a top-level message if any.
        Err(_) => serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string)),
    };
    let mut line = match message {
        Some(m) => format!("{m} ({status})"),
        None => {
            let text = String::from_utf8_lossy(body);
            let first = text.lines().next().unwrap_or("").trim();
            if first.is_empty() {
                format!("the admin API answered {status}")
            } else {
                format!("the admin API answered {status}: {first}")
            }
        }
    };
    if status == 401 {
        line += " — check --token, FLEETCORE_ADMIN_TOKEN or <data-dir>/admin.token \
                 (or --client-cert/--client-key over https)";
    }
    line
}

/// The token: --token or FLEETCORE_ADMIN_TOKEN, else <data-dir>/admin.token.
fn token(opts: &ClientOpts) -> Result<String> {
    if let Some(t) = &opts.token {
        let t = t.trim();
        if t.is_empty() {
            bail!("the admin token given with --token or FLEETCORE_ADMIN_TOKEN is empty");
        }
        return Ok(t.to_string());
    }
    let path = opts.data_dir().join("admin.token");
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        Ok(_) => bail!("the admin token file {} is empty", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "no admin token: {} does not exist and neither --token nor FLEETCORE_ADMIN_TOKEN \
             is set (point --data-dir at the server's data directory, or pass the token)",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => bail!(
            "cannot read the admin token {}: permission denied (run as the user that runs \
             fleetcore serve, or pass --token)",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot read the admin token {}", path.display())),
    }
}

/// Percent-encodes one path segment (everything but RFC 3986's unreserved characters).
fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes a file that must not exist yet, with `mode` from its creation (a key is never
/// readable by others, not even for an instant).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                anyhow!(
                    "{} already exists; refusing to overwrite it",
                    path.display()
                )
            } else {
                anyhow!("cannot create {}: {e}", path.display())
            }
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a file through a temporary one and a rename, so readers (a web server serving
/// the CRL) never see half of it.
fn write_replace(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    let tmp = dir.join(name);
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, 0o644)?;
    fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

/// Prints the raw JSON with `--json`, else what `human` makes of it.
fn show(opts: &ClientOpts, reply: &Reply, human: impl FnOnce(&Value) -> String) -> Result<()> {
    if opts.json {
        return reply.print_raw();
    }
    let value = if reply.body.is_empty() {
        Value::Null
    } else {
        reply.json()?
    };
    let mut text = human(&value);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    print_out(&text)
}

/// As [`show`], reading the answer as the API model `T`.
fn show_as<T: DeserializeOwned>(
    opts: &ClientOpts,
    reply: &Reply,
    human: impl FnOnce(&T) -> String,
) -> Result<()> {
    if opts.json {
        return reply.print_raw();
    }
    let mut text = human(&reply.parse()?);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    print_out(&text)
}

fn or_dash(v: Option<&str>) -> String {
    v.map_or_else(|| "-".to_string(), str::to_owned)
}

/// Items comma-separated, or "-".
fn joined_list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(", ")
    }
}

/// [`format_ms`] of an unsigned time as the API models carry it.
fn format_ms_u(ms: u64) -> String {
    format_ms(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Writes to stdout; a closed pipe (`| head`) ends the output quietly.
fn print_out(text: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("cannot write output"),
        _ => Ok(()),
    }
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn field(v: &Value, key: &str) -> String {
    v.get(key).map(scalar).unwrap_or_else(|| "-".to_string())
}

/// `label:  value` lines with the values aligned.
fn details(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    rows.iter()
        .map(|(k, v)| format!("{:<width$}  {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Columns padded to their widest cell; `empty` instead when there are no rows.
fn table(headers: &[&str], rows: Vec<Vec<String>>, empty: &str) -> String {
    if rows.is_empty() {
        return empty.to_string();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date: Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_ms(1_767_225_599_999), "2025-12-31T23:59:59Z");
        assert_eq!(format_ms(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(enc("computer-a_1.x~"), "computer-a_1.x~");
        assert_eq!(enc("a:b/c d"), "a%3Ab%2Fc%20d");
    }

    #[test]
    fn attributes_split_at_the_first_equals_sign() {
        assert_eq!(parse_attr("k=v=w").unwrap(), ("k".into(), "v=w".into()));
        assert_eq!(parse_attr("k=").unwrap(), ("k".into(), String::new()));
        assert!(parse_attr("=v").is_err());
        assert!(parse_attr("kv").is_err());
    }

    #[test]
    fn api_errors_become_one_line_with_the_status() {
        let body = br#"{"error":{"code":"NotFound","message":"thing \"x\" not found"}}"#;
        assert_eq!(api_error_message(404, body), "thing \"x\" not found (404)");
        assert_eq!(
            api_error_message(502, b"Bad gateway\nmore"),
            "the admin API answered 502: Bad gateway"
        );
        assert!(api_error_message(401, b"").contains("--token"));
    }

    #[test]
    fn tables_align_columns_and_leave_the_last_unpadded() {
        let t = table(
            &["NAME", "TYPE"],
            vec![vec!["a-long-name".into(), "x".into()]],
            "none",
        );
        assert_eq!(t, "NAME         TYPE\na-long-name  x");
        assert_eq!(table(&["NAME"], vec![], "no things"), "no things");
    }

    #[test]
    fn policy_versions_sort_numerically() {
        let v = |n: u64| json!({"document": "{}", "created_ms": n});
        let p: PolicyRecord = serde_json::from_value(json!({
            "name": "p", "default_version": 2, "created_ms": 0,
            "versions": {"10": v(3), "2": v(2), "1": v(1)},
        }))
        .unwrap();
        assert_eq!(version_list(&p, ","), "1,2,10");
    }
}
