//! `tally top` for real in a terminal: tmux runs it at 80×24 against an
//! agent on the simulator with tenants in real cgroups; the test reads the
//! screen (`capture-pane`), presses keys (`send-keys`) and checks that `q`
//! ends it with status 0.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tally_e2e::{Agent, Cgroup, SimNode, require_root, skip, tally_bin, unique, wait_for};

const CONFIG: &str = r#"
[[tenant.rule]]
cgroup = '/tally/(?P<tenant>[^/]+)/'
"#;

/// A tmux server of its own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// tmux on PATH, installed from Debian when root and missing (as
/// `xtask/src/deps.rs` does); `false` after a skip when it cannot be had.
fn have_tmux() -> bool {
    let found = || Command::new("tmux").arg("-V").output().is_ok();
    if found() {
        return true;
    }
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "tmux"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if found() {
        return true;
    }
    skip("tmux is missing and `apt-get install tmux` failed");
    false
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn top_shows_gpus_and_tenants_sorts_and_quits_on_q() {
    if !require_root() || !have_tmux() {
        return;
    }
    let node = SimNode::standard();
    let base = unique("e2e-top");
    let acme = Cgroup::create(&format!("{base}/tally/acme/job1"));
    let beta = Cgroup::create(&format!("{base}/tally/beta/job1"));
    let a = acme.spawn("sleep", &["600"]);
    let b = beta.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 8192, 0.5);
    node.register(b.pid(), 2, Some(0), 2048, 0.3);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "300ms"]);
    agent.wait_samples(2);

    // The status goes to a side file renamed into place: `echo $? > f`
    // creates `f` empty before it writes, and a poll in between read "".
    let exit_file: PathBuf = node.dir.path().join("top.exit");
    let script = format!(
        "{} top --agent http://{}; echo $? > {tmp} && mv {tmp} {}",
        shell_quote(&tally_bin()),
        agent.addr,
        shell_quote(&exit_file),
        tmp = shell_quote(&node.dir.path().join("top.exit.tmp")),
    );
    let tmux = Tmux {
        socket: unique("tally-top"),
    };
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "80",
        "-y",
        "24",
        "sh",
        "-c",
        &script,
    ]);
    assert!(started.status.success(), "tmux: {started:?}");

    // A capture can land mid-frame: wait for a whole one (every part and
    // acme's memory on its row); past 30 s, the asserts name what is missing.
    const WANT: [&str; 7] = [
        "GPUs", "Tenants", "STATE", "busy", "free", "node ", "q quit",
    ];
    let acme_row = |s: &str| {
        s.lines()
            .any(|l| l.starts_with("acme") && l.contains("8.0G"))
    };
    let mut screen = String::new();
    for _ in 0..300 {
        screen = tmux.screen();
        let whole = WANT.iter().all(|w| screen.contains(w));
        if whole && acme_row(&screen) && screen.contains("beta") && screen.contains("2/") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for want in WANT {
        assert!(screen.contains(want), "{want:?} not on screen:\n{screen}");
    }
    assert!(acme_row(&screen), "acme's 8 GiB on its row:\n{screen}");
    assert!(
        screen.lines().all(|l| l.chars().count() <= 80),
        "wider than 80 columns:\n{screen}"
    );

    // `m` sorts by memory: the title says so and acme (8 GiB) leads.
    tmux.run(&["send-keys", "-t", "top", "m"]);
    let screen = wait_for("sort by memory", Duration::from_secs(10), || {
        let s = tmux.screen();
        let rows = s
            .lines()
            .filter(|l| l.starts_with("acme") || l.starts_with("beta"));
        (s.contains("by memory") && rows.count() == 2).then_some(s)
    });
    let order: Vec<_> = screen
        .lines()
        .filter(|l| l.starts_with("acme") || l.starts_with("beta"))
        .collect();
    assert!(order[0].starts_with("acme"), "{screen}");
    assert!(!exit_file.exists(), "top exited before q:\n{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let code = wait_for("tally top to exit on q", Duration::from_secs(10), || {
        std::fs::read_to_string(&exit_file).ok()
    });
    assert_eq!(code.trim(), "0", "tally top exit status");
    drop((a, b));
}

/// Piped, `tally top` prints one frame with rates even when the agent
/// samples less often than top's default one-second refresh: it polls
/// until the sample count moves. Before the fix the two polls a second
/// apart could see one sample and print `-` for every rate.
#[test]
fn piped_top_waits_for_a_new_sample_to_show_rates() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let acme = Cgroup::create(&format!("{}/tally/acme/job1", unique("e2e-top")));
    let a = acme.spawn("sleep", &["600"]);
    node.register(a.pid(), 0, None, 8192, 0.5);
    let agent = Agent::start(&node, CONFIG, &["--sample-interval", "3s"]);
    agent.wait_samples(1);

    let out = Command::new(tally_bin())
        .args(["top", "--agent", &format!("http://{}", agent.addr)])
        .output()
        .expect("run tally top");
    assert!(out.status.success(), "{out:?}");
    let frame = String::from_utf8_lossy(&out.stdout);
    let acme_row = frame
        .lines()
        .find(|l| l.starts_with("acme"))
        .unwrap_or_else(|| panic!("no acme row:\n{frame}"));
    assert!(
        acme_row.split_whitespace().any(|w| w
            .strip_suffix('W')
            .is_some_and(|n| n.parse::<f64>().is_ok())),
        "acme's power rate is known:\n{frame}"
    );
    drop(a);
}
