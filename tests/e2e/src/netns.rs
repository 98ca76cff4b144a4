//! Hosts with addresses of their own on this one machine: network
//! namespaces (`ip netns`) joined by veth pairs, for the partition tests
//! (`tests/partition.rs`). Processes run inside one with [`command`]; the
//! test itself reaches in with [`enter`] and [`http_get`].
//! Namespaces (and with them their links) are deleted on drop, panics
//! included.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
};

use crate::unique;

/// One network namespace, with its loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

/// Runs `ip args…`; the error names the command and what it said.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A new namespace named after `role` and this test run; `Err` says
    /// why none can be made here (no `ip`, no privilege), for a skip.
    pub fn add(role: &str) -> Result<Netns, String> {
        let name = unique(&format!("tally-{role}"));
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <this> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

/// `program`, run inside the namespace `ns` when there is one (`ip netns
/// exec`, which execs it: the child's pid is the program's).
pub fn command(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// `GET path`, from inside the namespace `ns` when there is one.
pub fn http_get(ns: Option<&str>, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    match ns {
        Some(ns) => enter(ns, || crate::http_get(addr, path)),
        None => crate::http_get(addr, path),
    }
}

/// Runs `f` on a thread that has joined the namespace `name`: sockets it
/// opens are that host's (`127.0.0.1` is its own loopback).
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive, unnamed; the
        // fixtures that started them kill them first (declared later).
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// A veth pair between two namespaces, one `/24` address at each end.
pub struct Link {
    /// The `b` end's namespace and interface, which [`Link::down`] cuts.
    b: String,
    b_if: String,
    /// The address of the `a` end (what `b` connects to).
    pub a_addr: Ipv4Addr,
    pub b_addr: Ipv4Addr,
}

impl Link {
    /// Joins `a` (`10.<net>.0.1`) and `b` (`10.<net>.0.2`); interfaces
    /// are named after the peer namespace's index `net`.
    pub fn join(a: &Netns, b: &Netns, net: u8) -> Result<Link, String> {
        let (a_if, b_if) = (format!("to-b{net}"), format!("to-a{net}"));
        let (a_addr, b_addr) = (Ipv4Addr::new(10, net, 0, 1), Ipv4Addr::new(10, net, 0, 2));
        ip(&[
            "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
            &b.name,
        ])?;
        for (ns, dev, addr) in [(a, &a_if, a_addr), (b, &b_if, b_addr)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        Ok(Link {
            b: b.name.clone(),
            b_if,
            a_addr,
            b_addr,
        })
    }

    /// Cuts the link at the `b` end (its route to `a` goes with it).
    pub fn down(&self) {
        ip(&["-n", &self.b, "link", "set", &self.b_if, "down"]).expect("link down");
    }

    /// Brings the `b` end back, with its address and route.
    pub fn up(&self) {
        ip(&["-n", &self.b, "link", "set", &self.b_if, "up"]).expect("link up");
    }
}
