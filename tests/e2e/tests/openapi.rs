//! The published API contract against the code: `docs/openapi.yaml` and
//! `docs/openapi-agent.yaml` list exactly the routes of the aggregator's
//! and the agent's routers, and schemathesis — a tool we did not write —
//! fuzzes a live aggregator on SQLite from the document with each role's
//! token: no 5xx, every response as documented (status, content type,
//! headers, schema), 405 with `Allow` for undeclared methods, and every
//! 4xx with a reason (`tests/e2e/schemathesis/tally_checks.py`); and the
//! agent, on the NVML simulator, from its document.
//!
//! schemathesis comes from PyPI into `target/schemathesis/venv` (pinned in
//! `tests/e2e/schemathesis/requirements.txt`); without it the fuzzing test
//! says SKIPPED with the reason. Its findings are in docs/faults.md.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tally_e2e::{
    Agent, SimNode,
    aggregator_support::{ACME_TOKEN, ADMIN_TOKEN, AGENT_TOKEN, Aggregator, router_routes, sqlite},
    http_exchange, skip, target_dir,
};

/// Examples per operation and phase: the run stays near a minute for all
/// roles on 2 shared cores.
const MAX_EXAMPLES: &str = "25";
/// Fixed, so a finding reproduces; `TALLY_SCHEMATHESIS_SEED` explores others.
const SEED: &str = "19";
/// One role's run is killed (and fails) after this.
const RUN_LIMIT: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `(METHOD, path)` of every operation of an OpenAPI document.
fn documented(file: &str) -> BTreeSet<(String, String)> {
    let path = repo().join(file);
    let text = std::fs::read_to_string(&path).expect("read the OpenAPI document");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{file}: not OpenAPI 3"
    );
    let paths = doc["paths"].as_mapping().expect("paths");
    let mut out = BTreeSet::new();
    for (p, item) in paths {
        let p = p.as_str().expect("path").to_owned();
        for (m, _) in item.as_mapping().expect("path item") {
            let m = m.as_str().expect("method");
            if matches!(
                m,
                "get" | "put" | "post" | "delete" | "options" | "head" | "patch" | "trace"
            ) {
                out.insert((m.to_ascii_uppercase(), p.clone()));
            }
        }
    }
    out
}

/// The paths of the agent's router: the `"/…" =>` arms of `route` in
/// `agent/src/run.rs` (it serves GET and HEAD on each).
fn agent_paths() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("agent/src/run.rs")).expect("agent router");
    let body = text
        .split_once("\nfn route(")
        .expect("the agent's `fn route`")
        .1;
    body.lines()
        .filter_map(|l| l.trim().strip_prefix('"')?.split_once("\" =>"))
        .map(|(p, _)| p.to_owned())
        .filter(|p| p.starts_with('/'))
        .collect()
}

#[test]
fn the_documents_list_exactly_the_routers_routes() {
    let routes = router_routes();
    let doc = documented("docs/openapi.yaml");
    assert_eq!(
        doc.difference(&routes).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented in docs/openapi.yaml, but not routed by aggregator/src/server.rs"
    );
    assert_eq!(
        routes.difference(&doc).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routed by aggregator/src/server.rs, but not in docs/openapi.yaml"
    );

    let agent = agent_paths();
    assert!(agent.len() >= 4, "no agent routes found: {agent:?}");
    let doc = documented("docs/openapi-agent.yaml");
    let want: BTreeSet<_> = agent
        .iter()
        .map(|p| ("GET".to_owned(), p.clone()))
        .collect();
    assert_eq!(
        doc, want,
        "docs/openapi-agent.yaml against agent/src/run.rs"
    );
}

/// schemathesis finding: a 405 had no `Allow` header (RFC 9110 requires
/// it), and `/healthz`, `/readyz` and `/` answered other methods with 404.
#[test]
fn an_undeclared_method_gets_405_naming_the_documented_ones() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    let mut by_path: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (method, path) in documented("docs/openapi.yaml") {
        by_path.entry(path).or_default().push(method);
    }
    for (path, mut methods) in by_path {
        methods.sort();
        let auth = format!("Bearer {ADMIN_TOKEN}");
        for method in ["PUT", "DELETE", "PATCH"] {
            let (status, head, body) =
                http_exchange(agg.addr, method, &path, &[("Authorization", &auth)], b"")
                    .expect("request");
            assert_eq!(status, 405, "{method} {path}: {body}");
            let allow = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("allow").then(|| v.trim().to_owned())
                })
                .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow:\n{head}"));
            let mut allowed: Vec<_> = allow.split(',').map(|m| m.trim().to_owned()).collect();
            allowed.sort();
            assert_eq!(allowed, methods, "{method} {path}: Allow");
            assert!(body.contains("\"error\""), "{method} {path}: {body}");
        }
    }
}

/// A python3 (≥ 3.9, what schemathesis 4 needs) to make the venv with.
fn python() -> Option<PathBuf> {
    ["python3", "/root/.pyenv/versions/3.12.1/bin/python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .args([
                    "-c",
                    "import sys, venv; sys.exit(sys.version_info < (3, 9))",
                ])
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// `target/schemathesis/venv/bin/schemathesis`, made once per test binary:
/// the tests of this file run in parallel, and two of them making the same
/// venv at once break each other's `ensurepip`.
fn schemathesis() -> Result<PathBuf, String> {
    static VENV: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    VENV.get_or_init(install_schemathesis).clone()
}

/// Makes the venv on first use and remakes it when the requirements change
/// (as tests/ops/run.sh does its venv); `Err` says why it cannot be had.
fn install_schemathesis() -> Result<PathBuf, String> {
    let root = target_dir().parent().expect("target/").join("schemathesis");
    let venv = root.join("venv");
    let bin = venv.join("bin/schemathesis");
    let requirements = repo().join("tests/e2e/schemathesis/requirements.txt");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read(&requirements).map_err(|e| e.to_string())?;
    if bin.exists() && std::fs::read(&stamp).ok().as_ref() == Some(&wanted) {
        return Ok(bin);
    }
    let python = python().ok_or("no python3 >= 3.9 with venv on this machine")?;
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<_> = err.lines().rev().take(5).collect();
        Err(format!("{what} failed: {}", tail.join(" / ")))
    };
    eprintln!("openapi: installing schemathesis into {}", venv.display());
    run(
        Command::new(&python).arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        "pip install schemathesis (PyPI)",
    )?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(bin)
}

/// One schemathesis run of `doc` against `url`, as `name`, with `token`
/// (none: only unauthenticated calls); returns whether it passed, and its
/// output (also in `target/debug/schemathesis-<name>.log`).
fn fuzz(bin: &Path, doc: &str, url: &str, name: &str, token: Option<&str>) -> (bool, String) {
    let here = repo().join("tests/e2e/schemathesis");
    let seed = std::env::var("TALLY_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_owned());
    let mut cmd = Command::new(bin);
    if !doc.contains("agent") {
        // Its exceptions name the aggregator's operations.
        cmd.arg("--config-file").arg(here.join("schemathesis.toml"));
    }
    cmd.arg("run")
        .arg(repo().join(doc))
        .args(["--url", url])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", &seed])
        .args(["--workers", "1", "--request-timeout", "30", "--no-color"])
        .env("PYTHONPATH", &here)
        .env("SCHEMATHESIS_HOOKS", "tally_checks")
        // Its own files (caches, reports) stay out of the repository.
        .current_dir(target_dir())
        .stdin(Stdio::null());
    if let Some(t) = token {
        cmd.args(["--header", &format!("Authorization: Bearer {t}")]);
    }
    if doc.contains("agent") {
        cmd.env("TALLY_REASON_AS_TEXT", "1");
    }
    let log = target_dir().join(format!("schemathesis-{name}.log"));
    let file = std::fs::File::create(&log).expect("schemathesis log");
    let mut child = cmd
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("spawn schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait schemathesis") {
            break Some(s);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Some(s) => (s.success(), out),
        None => (false, format!("killed after {RUN_LIMIT:?}\n{out}")),
    }
}

#[test]
fn schemathesis_finds_nothing_with_any_role() {
    let bin = match schemathesis() {
        Ok(b) => b,
        Err(why) => {
            skip(&format!("schemathesis cannot be installed: {why}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    let mut failed = Vec::new();
    for (role, token) in [
        ("admin", ADMIN_TOKEN),
        ("agent", AGENT_TOKEN),
        ("tenant", ACME_TOKEN),
    ] {
        let (ok, out) = fuzz(&bin, "docs/openapi.yaml", &agg.url(), role, Some(token));
        let summary: Vec<_> = out
            .lines()
            .filter(|l| l.contains(" in ") && l.starts_with('='))
            .collect();
        eprintln!("schemathesis as {role}: {}", summary.join(" "));
        if !ok {
            failed.push(format!("--- as {role}:\n{out}"));
        }
    }
    assert!(
        !agg.log_text().contains("panicked"),
        "the aggregator panicked:\n{}",
        agg.log_text()
    );
    assert!(
        failed.is_empty(),
        "schemathesis failed:\n{}",
        failed.join("\n")
    );
}

/// The agent against docs/openapi-agent.yaml. schemathesis finding: its 405
/// had no `Allow` header either.
#[test]
fn schemathesis_finds_nothing_on_the_agent() {
    let node = SimNode::standard();
    let agent = Agent::start(&node, "", &["--sample-interval", "200ms"]);
    let (status, head, _) = http_exchange(agent.addr, "DELETE", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase().contains("\r\nallow: get, head"),
        "405 without Allow:\n{head}"
    );
    let bin = match schemathesis() {
        Ok(b) => b,
        Err(why) => {
            skip(&format!("schemathesis cannot be installed: {why}"));
            return;
        }
    };
    let url = format!("http://{}", agent.addr);
    let (ok, out) = fuzz(&bin, "docs/openapi-agent.yaml", &url, "node-agent", None);
    assert!(ok, "schemathesis failed on the agent:\n{out}");
    assert!(!agent.log_text().contains("panicked"));
}
