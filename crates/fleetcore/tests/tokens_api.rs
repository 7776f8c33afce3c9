//! Device tokens through a real `fleetcore serve`: issued with the admin API and the CLI
//! (`fleetcore token ...`), refused with precise reasons, signed by the keys the API
//! lists (checked here with their published public keys, independently of the server),
//! still verifiable after a rotation, and kept across a restart.
//!
//! The MQTT side (a token as the CONNECT password) is not exercised here.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

fn broker() -> TestBroker {
    TestBroker::start(BrokerOpts::new().tls().registry().server_pki().admin())
}

fn expect(resp: &HttpResponse, status: u16) -> Value {
    assert_eq!(resp.status, status, "{}", resp.text());
    resp.json()
}

/// Asserts an error answer and returns its message.
fn expect_error(resp: &HttpResponse, status: u16, code: &str) -> String {
    let v = expect(resp, status);
    assert_eq!(v["error"]["code"], code, "{v}");
    v["error"]["message"].as_str().expect("message").to_string()
}

/// A thing with a certificate from the server's CA (ACTIVE, attached); its id.
fn device(broker: &TestBroker, thing: &str) -> String {
    let v = expect(
        &broker.admin(
            "POST",
            "/certificates/create",
            Some(&json!({ "thing": thing })),
        ),
        201,
    );
    v["certificate_id"]
        .as_str()
        .expect("certificate_id")
        .to_string()
}

fn issue(broker: &TestBroker, body: Value) -> Value {
    expect(&broker.admin("POST", "/tokens", Some(&body)), 201)
}

fn keys(broker: &TestBroker) -> Vec<Value> {
    let v = expect(&broker.admin("GET", "/tokens/keys", None), 200);
    v["keys"].as_array().expect("keys array").clone()
}

/// Base64url without padding, decoded here without the server's code.
fn b64url(text: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("{c:?} is not base64url in {text:?}"),
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// A token's parts: (claims, the signed text `fct1.<claims>`, signature).
fn decode(token: &str) -> (Value, String, Vec<u8>) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert_eq!(parts[0], "fct1", "{token}");
    let claims: Value = serde_json::from_slice(&b64url(parts[1])).expect("claims JSON");
    (claims, format!("fct1.{}", parts[1]), b64url(parts[2]))
}

/// Whether `token`'s signature checks out with the listed key `key` (its public part).
fn signed_by(token: &str, key: &Value) -> bool {
    let public = b64url(key["public_key"].as_str().expect("public_key"));
    assert_eq!(public.len(), 32, "{key}");
    let (_, signed, signature) = decode(token);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
        .verify(signed.as_bytes(), &signature)
        .is_ok()
}

fn key_named<'a>(keys: &'a [Value], kid: &str) -> &'a Value {
    keys.iter()
        .find(|k| k["key_id"] == kid)
        .unwrap_or_else(|| panic!("no key {kid} in {keys:?}"))
}

/// `date -u` for these seconds, as RFC 3339: a clock formatting the server does not share.
fn utc(secs: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("run date");
    assert!(out.status.success(), "date: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The CLI against this broker's admin API, reading its token from its data directory.
fn cli(broker: &TestBroker, args: &[&str]) -> Output {
    let mut cmd = Command::new(broker_binary());
    cmd.args(args)
        .arg("--admin-url")
        .arg(broker.admin_url())
        .arg("--data-dir")
        .arg(broker.data_dir())
        .env_remove("FLEETCORE_ADMIN_URL")
        .env_remove("FLEETCORE_ADMIN_TOKEN")
        .env_remove("FLEETCORE_DATA_DIR")
        .current_dir(Path::new("/"));
    run(cmd, STEP)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_token_from_the_api_names_its_thing_certificate_and_key_and_is_signed_by_it() {
    let broker = broker();
    let cert = device(&broker, "computer-a");
    assert!(keys(&broker).is_empty(), "no key before the first token");

    let before = now_secs();
    let t = issue(&broker, json!({"thing": "computer-a", "ttl": "1h"}));
    let after = now_secs();
    assert_eq!(t["thing"], "computer-a");
    assert_eq!(t["certificate_id"], cert.as_str());
    let issued_ms = t["issued_at_ms"].as_u64().expect("issued_at_ms");
    let expires_ms = t["expires_at_ms"].as_u64().expect("expires_at_ms");
    assert!((before..=after).contains(&(issued_ms / 1000)), "{t}");
    assert_eq!(expires_ms - issued_ms, 3_600_000);
    assert_eq!(t["issued_at"], utc(issued_ms / 1000).as_str());
    assert_eq!(t["expires_at"], utc(expires_ms / 1000).as_str());

    let token = t["token"].as_str().expect("token");
    let (claims, _, signature) = decode(token);
    assert_eq!(signature.len(), 64);
    assert_eq!(claims["v"], 1);
    assert_eq!(claims["kid"], t["key_id"]);
    assert_eq!(claims["thing"], "computer-a");
    assert_eq!(claims["cert"], cert.as_str());
    assert_eq!(claims["iat"].as_u64(), Some(issued_ms / 1000));
    assert_eq!(claims["exp"].as_u64(), Some(expires_ms / 1000));
    let jti = claims["jti"].as_str().expect("jti");
    assert!(
        jti.len() == 32 && jti.bytes().all(|b| b.is_ascii_hexdigit()),
        "{jti}"
    );
    assert_eq!(claims.as_object().unwrap().len(), 7, "{claims}");

    // The first token made the signing key; the API lists it, public part only.
    let ks = keys(&broker);
    assert_eq!(ks.len(), 1, "{ks:?}");
    let k = &ks[0];
    assert_eq!(k["key_id"], t["key_id"]);
    assert_eq!(k["signing"], true);
    assert!(k.get("verify_until").is_none(), "{k}");
    assert_eq!(
        k["created"],
        utc(k["created_ms"].as_u64().unwrap() / 1000).as_str()
    );
    assert!(
        signed_by(token, k),
        "the token verifies with the listed key"
    );
    let text = serde_json::to_string(&ks).unwrap();
    assert!(
        !text.to_lowercase().contains("pkcs8") && !text.contains("private"),
        "{text}"
    );

    // A forged payload does not verify with it: the check above means something.
    let (_, _, sig) = decode(token);
    let mut forged = claims.clone();
    forged["thing"] = json!("computer-b");
    let payload = token.split('.').nth(1).unwrap();
    let forged_payload = token.replace(
        payload,
        &b64url_encode(&serde_json::to_vec(&forged).unwrap()),
    );
    assert_eq!(decode(&forged_payload).2, sig);
    assert!(!signed_by(&forged_payload, k));

    // Defaults and the other forms of the lifetime; a named certificate.
    let lifetime =
        |t: &Value| t["expires_at_ms"].as_u64().unwrap() - t["issued_at_ms"].as_u64().unwrap();
    let t = issue(&broker, json!({"thing": "computer-a"}));
    assert_eq!(lifetime(&t), 3_600_000, "default [tokens] default_ttl_secs");
    let t = issue(&broker, json!({"thing": "computer-a", "ttl_secs": 90}));
    assert_eq!(lifetime(&t), 90_000);
    for (ttl, secs) in [("90s", 90), ("30m", 1800), ("1d", 86_400)] {
        let t = issue(&broker, json!({"thing": "computer-a", "ttl": ttl}));
        assert_eq!(lifetime(&t), secs * 1000, "{ttl}");
    }
    let t = issue(
        &broker,
        json!({"thing": "computer-a", "ttl": 120, "certificate_id": cert}),
    );
    assert_eq!(lifetime(&t), 120_000);
    assert_eq!(t["certificate_id"], cert.as_str());
    assert_eq!(keys(&broker).len(), 1, "one key signs them all");
    broker.assert_no_panic_logged();
}

fn b64url_encode(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let (mut bits, mut n) = (0u32, 0);
    for b in bytes {
        bits = (bits << 8) | u32::from(*b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(A[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(A[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

#[test]
fn token_requests_are_refused_with_precise_reasons() {
    let broker = broker();
    let cert_a = device(&broker, "computer-a");
    let cert_b = device(&broker, "computer-b");
    let post = |body: Value| broker.admin("POST", "/tokens", Some(&body));

    let m = expect_error(&post(json!({"thing": "nobody"})), 404, "NotFound");
    assert_eq!(m, "thing \"nobody\" not found");

    expect(
        &broker.admin("POST", "/things", Some(&json!({"name": "bare"}))),
        201,
    );
    let m = expect_error(&post(json!({"thing": "bare"})), 409, "Conflict");
    assert!(
        m.contains("thing \"bare\" has no ACTIVE certificate attached"),
        "{m}"
    );

    // Only a revoked certificate left: none to stand for.
    expect(
        &broker.admin(
            "PUT",
            &format!("/certificates/{cert_b}/state"),
            Some(&json!({"state": "REVOKED"})),
        ),
        200,
    );
    let m = expect_error(&post(json!({"thing": "computer-b"})), 409, "Conflict");
    assert!(m.contains("no ACTIVE certificate"), "{m}");
    let m = expect_error(
        &post(json!({"thing": "computer-b", "certificate_id": cert_b})),
        409,
        "Conflict",
    );
    assert!(m.contains("is REVOKED"), "{m}");

    // Another thing's certificate, and one that does not exist.
    let m = expect_error(
        &post(json!({"thing": "computer-b", "certificate_id": cert_a})),
        409,
        "Conflict",
    );
    assert_eq!(
        m,
        format!("certificate {cert_a} is not attached to thing \"computer-b\"")
    );
    let m = expect_error(
        &post(json!({"thing": "computer-a", "certificate_id": "00ff"})),
        404,
        "NotFound",
    );
    assert!(m.contains("00ff"), "{m}");

    // Lifetimes.
    for (body, want) in [
        (
            json!({"thing": "computer-a", "ttl": "5x"}),
            "ttl \"5x\": expected",
        ),
        (
            json!({"thing": "computer-a", "ttl": "1h30m"}),
            "ttl \"1h30m\": expected",
        ),
        (
            json!({"thing": "computer-a", "ttl": true}),
            "expected a string",
        ),
        (
            json!({"thing": "computer-a", "ttl": -5}),
            "whole number of seconds",
        ),
        (
            json!({"thing": "computer-a", "ttl": "0s"}),
            "at least 1 second",
        ),
        (
            json!({"thing": "computer-a", "ttl_secs": 0}),
            "at least 1 second",
        ),
        (
            json!({"thing": "computer-a", "ttl": "25h"}),
            "token lifetime of 90000 s is more than the maximum of 86400 s ([tokens] max_ttl_secs)",
        ),
        (
            json!({"thing": "computer-a", "ttl": "1h", "ttl_secs": 60}),
            "either \"ttl\" or \"ttl_secs\"",
        ),
        (
            json!({"thing": "computer-a", "lifetime": "1h"}),
            "unknown field `lifetime`",
        ),
        (json!({"ttl": "1h"}), "missing field `thing`"),
    ] {
        let m = expect_error(&post(body.clone()), 400, "InvalidRequest");
        assert!(m.contains(want), "{body}: {m}");
    }
    // Nothing was issued, so no key was made.
    assert!(keys(&broker).is_empty());
    broker.assert_no_panic_logged();
}

#[test]
fn the_cli_prints_only_the_token_and_manages_keys() {
    let broker = broker();
    let cert = device(&broker, "computer-a");

    let out = cli(
        &broker,
        &["token", "issue", "--thing", "computer-a", "--ttl", "90s"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "{text:?}"
    );
    let token = text.trim();
    let (claims, _, _) = decode(token);
    assert_eq!(claims["thing"], "computer-a");
    assert_eq!(claims["cert"], cert.as_str());
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        90
    );
    let err = stderr(&out);
    assert!(
        err.contains("computer-a") && err.contains(&cert) && err.contains("expires"),
        "{err}"
    );
    let kid = claims["kid"].as_str().unwrap().to_string();
    assert!(signed_by(token, key_named(&keys(&broker), &kid)));

    let out = cli(
        &broker,
        &[
            "token",
            "issue",
            "--thing",
            "computer-a",
            "--cert",
            &cert,
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("--json output");
    assert_eq!(v["certificate_id"], cert.as_str());
    assert_eq!(v["key_id"], kid.as_str());
    assert!(v["token"].as_str().unwrap().starts_with("fct1."));

    // Refusals: one line on stderr, nothing on stdout (so $(...) captures nothing).
    let out = cli(&broker, &["token", "issue", "--thing", "nobody"]);
    assert!(!out.status.success());
    assert_eq!(stdout(&out), "");
    assert_eq!(
        stderr(&out).trim(),
        "fleetcore: thing \"nobody\" not found (404)"
    );
    let out = cli(
        &broker,
        &["token", "issue", "--thing", "computer-a", "--ttl", "2d"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("maximum of 86400 s") && stderr(&out).ends_with("(400)\n"));
    let out = cli(
        &broker,
        &["token", "issue", "--thing", "computer-a", "--ttl", "soon"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("ttl \"soon\""), "{}", stderr(&out));

    let out = cli(&broker, &["token", "keys"]);
    assert!(out.status.success(), "{}", describe(&out));
    let table = stdout(&out);
    assert!(table.starts_with("KEY ID"), "{table}");
    assert!(table.contains(&kid) && table.contains("signing"), "{table}");

    let out = cli(&broker, &["token", "rotate-key"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.starts_with("new signing key "), "{text}");
    assert!(
        text.contains(&format!("{kid}  ")) && text.contains("retired, verifies until"),
        "{text}"
    );

    let out = cli(&broker, &["token", "keys", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("keys --json");
    let ks = v["keys"].as_array().unwrap();
    assert_eq!(ks.len(), 2);
    assert_eq!(
        (ks[0]["key_id"].as_str(), &ks[0]["signing"]),
        (Some(kid.as_str()), &json!(false))
    );
    let out = cli(&broker, &["token", "rotate-key", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("rotate-key --json");
    assert_eq!(v["signing"], true);
    assert_eq!(keys(&broker).len(), 3);

    for args in [
        &["token", "--help"][..],
        &["token", "issue", "--help"],
        &["token", "keys", "--help"],
        &["token", "rotate-key", "--help"],
    ] {
        let out = cli(&broker, args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        assert!(stdout(&out).contains("Usage: fleetcore token"), "{args:?}");
    }
    let help = stdout(&cli(&broker, &["token", "issue", "--help"]));
    for flag in [
        "--thing",
        "--ttl",
        "--cert",
        "--json",
        "TOKEN=$(fleetcore token issue",
    ] {
        assert!(
            help.contains(flag),
            "token issue --help lacks {flag}:\n{help}"
        );
    }
    let top = stdout(&cli(&broker, &["--help"]));
    assert!(top.contains("\n  token "), "{top}");
}

#[test]
fn tokens_signed_before_a_rotation_still_verify() {
    let broker = broker();
    device(&broker, "computer-a");
    let old = issue(&broker, json!({"thing": "computer-a", "ttl": "24h"}));
    let old_kid = old["key_id"].as_str().unwrap().to_string();

    let new_key = expect(&broker.admin("POST", "/tokens/keys/rotate", None), 201);
    let new_kid = new_key["key_id"].as_str().unwrap().to_string();
    assert_ne!(new_kid, old_kid);
    assert_eq!(new_key["signing"], true);
    let new = issue(&broker, json!({"thing": "computer-a"}));
    assert_eq!(new["key_id"], new_kid.as_str());

    let ks = keys(&broker);
    assert_eq!(ks.len(), 2, "{ks:?}");
    let retired = key_named(&ks, &old_kid);
    let current = key_named(&ks, &new_kid);
    assert_eq!(retired["signing"], false);
    assert_eq!(current["signing"], true);
    // The retired key is accepted for max_ttl_secs after its successor was made: longer
    // than any token it signed can live.
    let until = retired["verify_until_ms"]
        .as_u64()
        .expect("verify_until_ms");
    assert_eq!(until, current["created_ms"].as_u64().unwrap() + 86_400_000);
    assert!(until >= old["expires_at_ms"].as_u64().unwrap());
    assert_eq!(retired["verify_until"], utc(until / 1000).as_str());

    let old_token = old["token"].as_str().unwrap();
    let new_token = new["token"].as_str().unwrap();
    assert!(signed_by(old_token, retired));
    assert!(!signed_by(old_token, current));
    assert!(signed_by(new_token, current));
    assert!(!signed_by(new_token, retired));
}

#[test]
fn token_keys_survive_a_restart() {
    let mut broker = broker();
    device(&broker, "computer-a");
    let first = issue(&broker, json!({"thing": "computer-a"}));
    expect(&broker.admin("POST", "/tokens/keys/rotate", None), 201);
    let before = keys(&broker);
    assert_eq!(before.len(), 2);

    // No flush: what the API acknowledged is on disk.
    broker.kill9();
    broker.restart();
    let after = keys(&broker);
    assert_eq!(after, before, "same ids, times, states and public keys");
    // The private key came back too: the same key signs, and old tokens still check out.
    let t = issue(&broker, json!({"thing": "computer-a"}));
    let signing = after.iter().find(|k| k["signing"] == true).unwrap();
    assert_eq!(t["key_id"], signing["key_id"]);
    assert!(signed_by(t["token"].as_str().unwrap(), signing));
    assert!(signed_by(
        first["token"].as_str().unwrap(),
        key_named(&after, first["key_id"].as_str().unwrap())
    ));
    broker.assert_healthy();
}

#[test]
fn configured_lifetimes_and_rotation_apply() {
    let broker = TestBroker::start(
        BrokerOpts::new()
            .tls()
            .registry()
            .server_pki()
            .admin()
            .tokens("max_ttl_secs", 600)
            .tokens("default_ttl_secs", 60)
            .tokens("key_rotation_secs", 1),
    );
    device(&broker, "computer-a");
    let t = issue(&broker, json!({"thing": "computer-a"}));
    let lifetime = t["expires_at_ms"].as_u64().unwrap() - t["issued_at_ms"].as_u64().unwrap();
    assert_eq!(lifetime, 60_000, "[tokens] default_ttl_secs");
    let m = expect_error(
        &broker.admin(
            "POST",
            "/tokens",
            Some(&json!({"thing": "computer-a", "ttl": "11m"})),
        ),
        400,
        "InvalidRequest",
    );
    assert!(m.contains("maximum of 600 s"), "{m}");
    issue(&broker, json!({"thing": "computer-a", "ttl": "10m"}));

    // The signing key is older than key_rotation_secs at the next issue: a new one signs.
    thread::sleep(Duration::from_millis(1100));
    let t2 = issue(&broker, json!({"thing": "computer-a"}));
    assert_ne!(t2["key_id"], t["key_id"]);
    let ks = keys(&broker);
    assert_eq!(ks.len(), 2, "{ks:?}");
    let retired = key_named(&ks, t["key_id"].as_str().unwrap());
    assert_eq!(
        retired["verify_until_ms"].as_u64().unwrap(),
        key_named(&ks, t2["key_id"].as_str().unwrap())["created_ms"]
            .as_u64()
            .unwrap()
            + 600_000
    );
}
