//! A PostgreSQL server of one test's own, inside a network namespace, that
//! the test may stop and start (`tests/partition.rs`). The shared test
//! server (`TALLY_TEST_POSTGRES_URL`, started by `cargo xtask test`) serves
//! every test at once and is never restarted.
//!
//! The server listens on `127.0.0.1:5432` of its namespace (the
//! aggregator's host, over TCP as in production) and on a Unix socket in
//! its directory, through which the test reads the ledger from outside.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use crate::netns::{self, Netns};

const PORT: u16 = 5432;

/// A private PostgreSQL cluster; stopped on drop.
pub struct PgServer {
    bin: PathBuf,
    home: tempfile::TempDir,
    netns: String,
}

/// The newest Debian PostgreSQL `bin/` directory, if any (xtask installs
/// the package when there is none).
pub fn debian_bin() -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .max_by_key(|p| {
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        })
}

/// `initdb` for a throw-away test cluster: no passwords, superuser
/// `postgres`, no fsync (xtask's shared test server uses the same).
pub const INITDB_ARGS: [&str; 7] = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"];

/// Runs `cmd`; the error names it and gives its stderr.
fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl PgServer {
    /// Initialises a cluster with a `tally` database and starts it in
    /// `netns`; `Err` says why not (PostgreSQL not installed), for a skip.
    pub fn start_in(netns: &Netns) -> Result<PgServer, String> {
        let bin = debian_bin().ok_or(
            "PostgreSQL is not installed (`apt-get install postgresql`; `cargo xtask test` does)",
        )?;
        let home = tempfile::tempdir().map_err(|e| e.to_string())?;
        // The server runs as `postgres`, which must own its files.
        fs::set_permissions(home.path(), fs::Permissions::from_mode(0o777))
            .map_err(|e| e.to_string())?;
        let pg = PgServer {
            bin,
            home,
            netns: netns.name.clone(),
        };
        run(pg
            .as_postgres("initdb")
            .arg("-D")
            .arg(pg.data())
            .args(INITDB_ARGS))?;
        pg.start();
        run(pg
            .as_postgres("createdb")
            .arg("-h")
            .arg(pg.home.path())
            .args(["-p", &PORT.to_string(), "-U", "postgres", "tally"]))?;
        Ok(pg)
    }

    /// `program` from the PostgreSQL binaries, as `postgres`, in the
    /// namespace, from `/` (the test's directory may be private).
    fn as_postgres(&self, program: &str) -> Command {
        let mut c = netns::command(Some(&self.netns), "runuser");
        c.args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .current_dir("/");
        c
    }

    fn data(&self) -> PathBuf {
        self.home.path().join("data")
    }

    /// The server's own log.
    pub fn log(&self) -> PathBuf {
        self.home.path().join("server.log")
    }

    /// The URL inside the namespace: TCP on its loopback.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{PORT}/tally")
    }

    /// The URL from anywhere on this machine: the Unix socket.
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://postgres@localhost:{PORT}/tally?host={}",
            self.home.path().display()
        )
    }

    /// Starts the server and waits until it takes connections.
    pub fn start(&self) {
        let options = format!(
            "-p {PORT} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.home.path().display()
        );
        run(self
            .as_postgres("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-o", &options, "-l"])
            .arg(self.log()))
        .unwrap_or_else(|e| panic!("{e}; server log:\n{}", self.log_text()));
    }

    /// Stops the server (`fast`: open sessions are cut, as a restart or a
    /// failover does) and waits until it is gone.
    pub fn stop(&self) {
        self.stop_mode("fast")
            .unwrap_or_else(|e| panic!("{e}; server log:\n{}", self.log_text()));
    }

    fn stop_mode(&self, mode: &str) -> Result<(), String> {
        run(self
            .as_postgres("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "60"]))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Where the cluster lives.
    pub fn home(&self) -> &Path {
        self.home.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.stop_mode("immediate");
    }
}
