//! A throwaway PostgreSQL for the ledger tests: Debian's `postgresql`
//! (installed when missing), a cluster initialised in a temporary
//! directory, trust auth on 127.0.0.1 and a free port.
//!
//! `cargo xtask test` calls [`ensure`] and exports the URL it returns as
//! `TALLY_TEST_POSTGRES_URL`; the PostgreSQL tests create their own
//! database on that server. The cluster is left running for the next run,
//! which reuses it and drops the databases of test processes that have
//! ended; `pg_ctl stop -D /tmp/tally-test-postgres/data` (as the
//! `postgres` user) or a reboot ends it.

use std::{
    fs,
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, bail};
use tally_e2e::pg_server::{INITDB_ARGS, debian_bin};

use crate::exec::is_root;

/// Where the cluster lives (data, socket, log, port).
fn home() -> PathBuf {
    std::env::temp_dir().join("tally-test-postgres")
}

/// Installs Debian's `postgresql` when no server binaries are there.
fn install() -> anyhow::Result<PathBuf> {
    if let Some(bin) = debian_bin() {
        return Ok(bin);
    }
    crate::deps::install(&["postgresql"])?;
    debian_bin().context("postgresql installed, but no initdb under /usr/lib/postgresql/*/bin")
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `program` from `bin`, as the `postgres` user when we are root (the
/// server refuses to run as root). It runs in `/`: the checkout we were
/// started in may be private (mode 0700) to that user.
fn pg(bin: &Path, program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(bin.join(program))
            .current_dir("/");
        c
    } else {
        Command::new(bin.join(program))
    }
}

fn url(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/tally_test")
}

fn running(bin: &Path, data: &Path) -> bool {
    pg(bin, "pg_ctl")
        .arg("status")
        .arg("-D")
        .arg(data)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether a server accepts connections on 127.0.0.1:`port`.
fn answers(bin: &Path, port: u16) -> bool {
    Command::new(bin.join("pg_isready"))
        .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The test process that made database `name`: the tests name theirs
/// `tally_<what>_<pid>_<n>` (`tally_e2e::unique`, the aggregator's
/// `postgres_database`).
fn creator(name: &str) -> Option<u32> {
    let mut fields = name.strip_prefix("tally_")?.rsplit('_');
    fields.next()?.parse::<u128>().ok()?;
    fields.next()?.parse().ok()
}

/// `psql` on the server's `tally_test` database, printing bare rows;
/// each `-c` added runs as its own statement.
fn psql(bin: &Path, port: u16) -> Command {
    let mut c = pg(bin, "psql");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", "tally_test", "-X", "-q", "-A", "-t"]);
    c
}

/// Drops the databases left on the reused server by test processes that
/// have ended (the tests do not drop their own: a ledger is open until the
/// process exits), so the server's disk does not grow with every run. A
/// test process still running, e.g. another checkout's run, keeps its own.
fn drop_databases_of_ended_tests(bin: &Path, port: u16) {
    let names = match run(psql(bin, port).args(["-c", "SELECT datname FROM pg_database"])) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => {
            eprintln!("xtask: cannot list the test PostgreSQL's databases: {e:#}");
            return;
        }
    };
    let ended: Vec<&str> = names
        .lines()
        .filter(|name| {
            creator(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    if ended.is_empty() {
        return;
    }
    let mut drop = psql(bin, port);
    for name in &ended {
        let quoted = name.replace('"', "\"\"");
        drop.args(["-c", &format!("DROP DATABASE IF EXISTS \"{quoted}\"")]);
    }
    match run(&mut drop) {
        Ok(_) => eprintln!(
            "xtask: dropped {} databases of ended test runs",
            ended.len()
        ),
        Err(e) => eprintln!("xtask: cannot drop the databases of ended test runs: {e:#}"),
    }
}

/// Makes sure a test PostgreSQL runs and returns its URL
/// (`postgres://postgres@127.0.0.1:PORT/tally_test`).
pub(crate) fn ensure() -> anyhow::Result<String> {
    if let Ok(url) = std::env::var("TALLY_TEST_POSTGRES_URL")
        && !url.is_empty()
    {
        return Ok(url);
    }
    let bin = install()?;
    let home = home();
    let data = home.join("data");
    let port_file = home.join("port");
    if let Ok(port) = fs::read_to_string(&port_file)
        && let Ok(port) = port.trim().parse::<u16>()
        && running(&bin, &data)
    {
        // A server started by hand on this directory with another port
        // runs, but the tests would all fail to connect: start over.
        if answers(&bin, port) {
            drop_databases_of_ended_tests(&bin, port);
            return Ok(url(port));
        }
        eprintln!(
            "xtask: the test PostgreSQL in {} runs but does not answer on 127.0.0.1:{port} \
             (its port file); restarting it",
            data.display()
        );
    }
    // Start over: a stale directory from a crashed run is of no use.
    if data.exists() {
        let _ = pg(&bin, "pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w"])
            .output();
    }
    let _ = fs::remove_dir_all(&home);
    fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
    // The server runs as `postgres`: it must own its directory.
    fs::set_permissions(&home, fs::Permissions::from_mode(0o777))?;
    run(pg(&bin, "initdb").arg("-D").arg(&data).args(INITDB_ARGS))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
        home.display()
    );
    run(pg(&bin, "pg_ctl")
        .arg("start")
        .arg("-D")
        .arg(&data)
        .args(["-w", "-t", "60", "-o", &options, "-l"])
        .arg(home.join("server.log")))
    .with_context(|| format!("see {}", home.join("server.log").display()))?;
    run(pg(&bin, "createdb")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .arg("tally_test"))?;
    fs::write(&port_file, port.to_string())?;
    eprintln!(
        "xtask: test PostgreSQL on 127.0.0.1:{port} ({})",
        home.display()
    );
    Ok(url(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by the tests that call `ensure`: two starting a server at
    /// once would initdb the same directory.
    static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The test server (held for the caller), its URL, port and binaries;
    /// `None`, saying skipped, where PostgreSQL can be neither found nor
    /// installed.
    fn server() -> Option<(std::sync::MutexGuard<'static, ()>, String, u16, PathBuf)> {
        if !is_root() && debian_bin().is_none() {
            println!("SKIPPED: not root and no PostgreSQL installed");
            return None;
        }
        let held = SERVER.lock().unwrap_or_else(|e| e.into_inner());
        let url = ensure().expect("a test PostgreSQL");
        let port = url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
            .expect("a port in the URL");
        let bin = debian_bin().expect("installed by ensure");
        Some((held, url, port, bin))
    }

    #[test]
    fn ensure_gives_a_server_that_answers() {
        let Some((_held, url, port, bin)) = server() else {
            return;
        };
        assert!(answers(&bin, port), "{url} does not answer");
        assert_eq!(ensure().unwrap(), url, "a second call reuses the server");
    }

    #[test]
    fn a_test_database_is_known_by_the_process_that_made_it() {
        assert_eq!(creator("tally_e2e_4242_7"), Some(4242));
        assert_eq!(
            creator("tally_month_reads_4242_1764000000000000000"),
            Some(4242)
        );
        for other in [
            "tally_test",
            "postgres",
            "tally_e2e_x_7",
            "tally_4242",
            "other_4242_7",
        ] {
            assert_eq!(creator(other), None, "{other}");
        }
    }

    /// The databases of a test process that ended go at the next run; a
    /// running process's stay.
    #[test]
    fn databases_of_ended_tests_are_dropped_and_of_running_ones_kept() {
        let Some((_held, _, port, bin)) = server() else {
            return;
        };
        let mut child = Command::new("true").spawn().unwrap();
        let ended_pid = child.id();
        child.wait().unwrap();
        let ended = format!("tally_xtask_{ended_pid}_1");
        let running = format!("tally_xtask_{}_1", std::process::id());
        let sql = |sql: &str| {
            let out = run(psql(&bin, port).args(["-c", sql])).unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for name in [&ended, &running] {
            sql(&format!("CREATE DATABASE {name}"));
        }
        drop_databases_of_ended_tests(&bin, port);
        let left = sql("SELECT datname FROM pg_database");
        let left: Vec<&str> = left.lines().collect();
        sql(&format!("DROP DATABASE {running}"));
        assert!(!left.contains(&ended.as_str()), "{ended} left: {left:?}");
        assert!(
            left.contains(&running.as_str()),
            "{running} dropped: {left:?}"
        );
        assert!(left.contains(&"tally_test"), "{left:?}");
    }
}
