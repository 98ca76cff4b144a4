//! eBPF probes end to end (issue 3): the real `tally agent` with its real
//! programs attached (cgroup_skb at the cgroup v2 root, uprobes on a fake
//! `libcuda.so.1`, raw tracepoints), real processes in real cgroup v2
//! directories beneath our own, real loopback TCP and UDP.
//!
//! How network expectations are computed: the programs count `skb->len`,
//! which at both hooks is the IP packet (IPv4 header + L4 header +
//! payload), once per skb (loopback GSO/GRO skbs are up to 64 KiB and carry
//! one header each). So for a tenant
//! - UDP: each datagram of `s` payload bytes is one skb of `s + 20 + 8`;
//! - TCP: payload + about 52 bytes per skb (20 IPv4 + 20 TCP + 12 for the
//!   timestamp option; a SYN carries 8 more), and the packet counter says
//!   how many skbs there were.
//!
//! - TCP retransmissions are bytes on the wire too: each side reports its
//!   `tcpi_bytes_retrans` (`helpers/netload.c`), added to the payload
//!   (loopback retransmits only after a spurious RTO on a loaded machine).
//!
//! The expected bytes are `payload + retransmitted + headers(packets)` and
//! the counters must match within 1 %, the tolerance the issue sets (with
//! 64 KiB skbs the header estimate moves the total by well under 0.1 %; a
//! SYN's 8 extra option bytes are the usual whole difference).
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use tally_e2e::{
    Agent, Cgroup, Metrics, SimNode,
    conservation::{Scrape, assert_conserved},
    other_user::{SharedDir, as_nobody, open_to_all, refusal},
    probes_support::{
        PinDir, TcpServer, fake_cuda, probe_config, retrans, start_agent_as_nobody, udp_sink,
    },
    require_root, skip, unique, wait_for,
};

const LONG: Duration = Duration::from_secs(60);
const PROBES: [&str; 6] = [
    "network_ingress",
    "network_egress",
    "pcie_uprobes",
    "process_exec",
    "process_exit",
    "process_stat",
];

/// IPv4 + UDP header bytes per datagram.
const UDP_HEADERS: u64 = 28;
/// IPv4 + TCP (with timestamps) header bytes per skb.
const TCP_HEADERS: u64 = 52;

fn net(m: &Metrics, tenant: &str, what: &str, direction: &str) -> u64 {
    m.value(
        &format!("tally_tenant_network_{what}_total"),
        &[("tenant", tenant), ("direction", direction)],
    )
    .unwrap_or(0.0) as u64
}

fn pcie(m: &Metrics, tenant: &str, direction: &str) -> u64 {
    m.value(
        "tally_tenant_pcie_bytes_total",
        &[("tenant", tenant), ("direction", direction)],
    )
    .unwrap_or(0.0) as u64
}

/// Network counters of one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    in_bytes: u64,
    in_packets: u64,
    out_bytes: u64,
    out_packets: u64,
}

fn net_of(m: &Metrics, tenant: &str) -> Net {
    Net {
        in_bytes: net(m, tenant, "bytes", "ingress"),
        in_packets: net(m, tenant, "packets", "ingress"),
        out_bytes: net(m, tenant, "bytes", "egress"),
        out_packets: net(m, tenant, "packets", "egress"),
    }
}

/// Asserts `got` is within 1 % of `want`.
fn within_1pct(what: &str, got: u64, want: u64) {
    let diff = got.abs_diff(want) as f64;
    assert!(
        diff <= want as f64 * 0.01,
        "{what}: counted {got}, expected {want} (±1 %), off by {diff}"
    );
}

/// Runs the fake-libcuda caller inside `cg` with `calls` (SYMBOL BYTES COUNT…).
fn cuda_in(cg: &Cgroup, calls: &[&str]) {
    let cuda = fake_cuda();
    let mut args = vec![cuda.lib.to_str().unwrap()];
    args.extend_from_slice(calls);
    let status = cg
        .command(&cuda.caller, &args)
        .stdin(Stdio::null())
        .status()
        .expect("run cuda-copy");
    assert!(status.success(), "cuda-copy {calls:?} failed: {status}");
}

/// Bytes the kernel sent twice in a workload (see `netload.c`).
#[derive(Debug, Clone, Copy)]
struct Retrans {
    /// By the tenant (counted at its egress).
    tenant: u64,
    /// By the peer (counted at the tenant's ingress).
    peer: u64,
}

/// A tenant workload over loopback: TCP `send` bytes out and `recv` back,
/// then `datagrams` UDP datagrams of `size` bytes. Returns once it exited.
fn network_workload(cg: &Cgroup, send: u64, recv: u64, datagrams: u64, size: u64) -> Retrans {
    let netload = &fake_cuda().netload;
    let server = TcpServer::start(send, recv);
    let port = server.addr.port().to_string();
    let out = cg
        .command(
            netload,
            &[
                "tcp-client",
                "127.0.0.1",
                &port,
                &send.to_string(),
                &recv.to_string(),
            ],
        )
        .stdin(Stdio::null())
        .output()
        .expect("run netload tcp-client");
    assert!(
        out.status.success(),
        "tcp-client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant = retrans(&String::from_utf8_lossy(&out.stdout));
    let peer = server.finish();

    let (udp, _sink) = udp_sink();
    let port = udp.port().to_string();
    let status = cg
        .command(
            netload,
            &[
                "udp-send",
                "127.0.0.1",
                &port,
                &datagrams.to_string(),
                &size.to_string(),
            ],
        )
        .stdin(Stdio::null())
        .status()
        .expect("run netload udp-send");
    assert!(status.success(), "udp-send failed: {status}");
    Retrans { tenant, peer }
}

/// Checks a tenant's counters against a workload (see the module docs).
fn check_network(
    tenant: &str,
    n: Net,
    (send, recv, datagrams, size): (u64, u64, u64, u64),
    r: Retrans,
) {
    assert!(
        n.out_packets > datagrams,
        "{tenant}: {n:?}: fewer egress packets than datagrams"
    );
    let tcp_out_packets = n.out_packets - datagrams;
    let want_out =
        send + r.tenant + tcp_out_packets * TCP_HEADERS + datagrams * (size + UDP_HEADERS);
    within_1pct(
        &format!("{tenant} egress bytes ({r:?})"),
        n.out_bytes,
        want_out,
    );
    let want_in = recv + r.peer + n.in_packets * TCP_HEADERS;
    within_1pct(
        &format!("{tenant} ingress bytes ({r:?})"),
        n.in_bytes,
        want_in,
    );
    // Payload alone is a floor no header guess can explain away.
    assert!(
        n.out_bytes >= send + datagrams * (size + UDP_HEADERS),
        "{tenant}: {n:?}"
    );
    assert!(n.in_bytes >= recv, "{tenant}: {n:?}");
}

struct Setup {
    base: Cgroup,
    pin: PinDir,
    state: tempfile::TempDir,
    node: SimNode,
}

fn setup(prefix: &str) -> Setup {
    let name = unique(prefix);
    Setup {
        base: Cgroup::create(&name),
        pin: PinDir::new(),
        state: tempfile::tempdir().expect("state dir"),
        node: SimNode::standard(),
    }
}

impl Setup {
    fn name(&self) -> &str {
        self.base.path.rsplit('/').next().unwrap()
    }

    fn tenant(&self, tenant: &str) -> Cgroup {
        let own = tally_e2e::own_unified_cgroup();
        let rel = self.base.path.trim_start_matches(own.trim_end_matches('/'));
        Cgroup::create(&format!("{}/{tenant}", rel.trim_start_matches('/')))
    }

    fn config(&self, interval: &str) -> String {
        probe_config(
            self.name(),
            &self.pin.0,
            self.state.path(),
            &[&fake_cuda().lib],
            interval,
        )
    }

    fn agent(&self, interval: &str) -> Agent {
        let agent = Agent::start(&self.node, &self.config(interval), &[]);
        let m = agent.metrics();
        for probe in PROBES {
            assert_eq!(
                m.value("tally_probe_up", &[("probe", probe)]),
                Some(1.0),
                "probe {probe} is not up; snapshot probes: {}\nlog:\n{}",
                agent.snapshot()["probes"],
                agent.log_text()
            );
        }
        agent
    }
}

/// Waits until `f(metrics)` holds, for at least two more samples (so a
/// counter that is still moving is seen moving).
fn settle(agent: &Agent, what: &str, f: impl Fn(&Metrics) -> bool) -> Metrics {
    wait_for(what, LONG, || f(&agent.metrics()).then_some(()));
    agent.wait_samples(2);
    agent.metrics()
}

#[test]
fn network_bytes_of_two_tenants_over_loopback_tcp_and_udp() {
    if !require_root() {
        return;
    }
    let s = setup("tally-probes-net");
    let agent = s.agent("500ms");
    let alpha = s.tenant("alpha");
    let beta = s.tenant("beta");

    // (send, recv, datagrams, size) per tenant; both processes exit before
    // the counters are read.
    let wa = (8u64 << 20, 1u64 << 20, 300u64, 1200u64);
    let wb = (2u64 << 20, 3u64 << 20, 1000u64, 100u64);
    let ra = network_workload(&alpha, wa.0, wa.1, wa.2, wa.3);
    let rb = network_workload(&beta, wb.0, wb.1, wb.2, wb.3);
    assert!(alpha.pids().is_empty() && beta.pids().is_empty());

    let m = settle(&agent, "both tenants counted", |m| {
        net_of(m, "alpha").out_bytes >= wa.0 && net_of(m, "beta").out_bytes >= wb.0
    });
    let a = net_of(&m, "alpha");
    let b = net_of(&m, "beta");
    eprintln!("alpha {a:?}\nbeta {b:?}");
    check_network("alpha", a, wa, ra);
    check_network("beta", b, wb, rb);

    // The cgroup of an exited tenant goes away: its bytes stay, folded into
    // the tenant (state file) before the map entry is deleted.
    drop(beta);
    let state_file = s.state.path().join("probes-state.json");
    wait_for("beta folded into the state file", LONG, || {
        let text = fs::read_to_string(&state_file).ok()?;
        let state: serde_json::Value = serde_json::from_str(&text).ok()?;
        (state["folded"]["beta"]["egress_bytes"].as_u64()? == b.out_bytes).then_some(())
    });
    agent.wait_samples(2);
    assert_eq!(
        net_of(&agent.metrics(), "beta"),
        b,
        "beta after its cgroup went"
    );
    assert_eq!(
        net_of(&agent.metrics(), "alpha"),
        a,
        "alpha did nothing since"
    );
}

#[test]
fn pcie_copies_of_two_tenants_are_exact() {
    if !require_root() {
        return;
    }
    let s = setup("tally-probes-pcie");
    let agent = s.agent("500ms");
    let alpha = s.tenant("alpha");
    let beta = s.tenant("beta");

    // Every form of the family; the generic cuMemcpy has no direction: it
    // goes to the caller as `other`, never into h2d or d2h.
    cuda_in(
        &alpha,
        &[
            "cuMemcpyHtoD_v2",
            "4096",
            "10", // 40960 h2d
            "cuMemcpyHtoDAsync_v2",
            "12345",
            "2", // 24690 h2d
            "cuMemcpyHtoD_v2_ptds",
            "7",
            "3", // 21 h2d
            "cuMemcpyHtoD",
            "100",
            "1", // 100 h2d (32-bit ABI)
            "cuMemcpy2D_v2@h2d",
            "4000",
            "2", // 8000 h2d
            "cuMemcpyDtoH_v2",
            "1000",
            "3", // 3000 d2h
            "cuMemcpyDtoHAsync_v2_ptsz",
            "65536",
            "1", // 65536 d2h
            "cuMemcpy",
            "777",
            "5", // direction unknown
            "cuMemcpyAsync",
            "555",
            "1", // direction unknown
        ],
    );
    cuda_in(
        &beta,
        &[
            "cuMemcpyDtoHAsync_v2",
            "1048576",
            "4", // 4194304 d2h
            "cuMemcpyDtoH_v2_ptds",
            "3",
            "5", // 15 d2h
            "cuMemcpyDtoH",
            "200",
            "2", // 400 d2h (32-bit ABI)
            "cuMemcpyDtoHAsync",
            "50",
            "1", // 50 d2h (32-bit ABI)
            "cuMemcpy2DAsync_v2_ptsz@d2h",
            "1024",
            "3", // 3072 d2h
            "cuMemcpy2DUnaligned_v2@h2d",
            "64",
            "1", // 64 h2d
            "cuMemcpyHtoDAsync_v2_ptsz",
            "9",
            "1", // 9 h2d
        ],
    );
    let want = [
        ("alpha", "h2d", 40960 + 24690 + 21 + 100 + 8000),
        ("alpha", "d2h", 3000 + 65536),
        ("beta", "h2d", 64 + 9),
        ("beta", "d2h", 4194304 + 15 + 400 + 50 + 3072),
        ("alpha", "other", 777 * 5 + 555),
        ("beta", "other", 0),
    ];
    let m = settle(&agent, "copies counted", |m| {
        want.iter().all(|(t, d, n)| pcie(m, t, d) >= *n)
    });
    for (tenant, dir, n) in want {
        assert_eq!(pcie(&m, tenant, dir), n, "{tenant} {dir}");
    }

    // What the devices moved (NVML, here the simulator's PCIe throughput
    // while alpha holds GPU 0) and the probes did not see is
    // _unattributed's, never spread: within one scrape,
    // _unattributed = device total − what the tenants were given, the
    // generic copies coming off host→device first.
    let holder = alpha.spawn("/bin/sleep", &["600"]);
    s.node.register(holder.pid(), 0, None, 1024, 0.5);
    let m = settle(&agent, "device PCIe bytes beyond the probes'", |m| {
        m.sum("tally_gpu_pcie_bytes_total", &[("direction", "rx")]) > 1e6
    });
    for (nvml_dir, dir) in [("rx", "h2d"), ("tx", "d2h")] {
        let device = m.sum("tally_gpu_pcie_bytes_total", &[("direction", nvml_dir)]);
        let mut tenants: u64 = ["alpha", "beta"].iter().map(|t| pcie(&m, t, dir)).sum();
        if dir == "h2d" {
            tenants += ["alpha", "beta"]
                .iter()
                .map(|t| pcie(&m, t, "other"))
                .sum::<u64>();
        }
        let unattributed = pcie(&m, "_unattributed", dir);
        let want = device - tenants as f64;
        // Each GPU's float total is truncated to whole bytes.
        assert!(
            (unattributed as f64 - want).abs() <= 4.0,
            "{dir}: _unattributed {unattributed}, device {device} − tenants {tenants} = {want}"
        );
    }
    for (tenant, dir, n) in want {
        assert_eq!(pcie(&m, tenant, dir), n, "{tenant} {dir} unchanged");
    }
    // The GPU accounts still add up on this scenario.
    let before = Scrape::of(&agent);
    agent.wait_samples(3);
    assert_conserved(&before, &Scrape::of(&agent));
    s.node.unregister(holder.pid());
}

#[test]
fn agent_restart_continues_counters_without_double_count() {
    if !require_root() {
        return;
    }
    let s = setup("tally-probes-restart");
    let alpha = s.tenant("alpha");
    let gone = s.tenant("gone");
    let first = Agent::start(&s.node, &s.config("300ms"), &[]);
    // The second agent starts on the same config file and address.
    let (config, addr) = (first.config.clone(), first.addr);

    let w = (4u64 << 20, 64u64 << 10, 50u64, 1000u64);
    let r1 = network_workload(&alpha, w.0, w.1, w.2, w.3);
    cuda_in(&alpha, &["cuMemcpyHtoD_v2", "1000", "7"]);
    network_workload(&gone, 1 << 20, 1000, 10, 10);
    cuda_in(&gone, &["cuMemcpyDtoH_v2", "333", "3"]);
    let before = settle(&first, "first agent counted", |m| {
        net_of(m, "alpha").out_bytes >= w.0
            && pcie(m, "alpha", "h2d") == 7000
            && pcie(m, "gone", "d2h") == 999
    });
    let gone_net = net_of(&before, "gone");
    // `gone` vanishes while the first agent runs: folded into the state.
    drop(gone);
    let state_file = s.state.path().join("probes-state.json");
    wait_for("gone folded", LONG, || {
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&state_file).ok()?).ok()?;
        (v["folded"]["gone"]["d2h_bytes"].as_u64()? == 999).then_some(())
    });
    let before = settle(&first, "fold settled", |_| true);
    let alpha_before = net_of(&before, "alpha");
    check_network("alpha", alpha_before, w, r1);

    // Kill -9 mid-test: no clean shutdown, no final state write.
    drop(first);
    let second = Agent::start_with(&s.node, &config, addr, &[]);
    second.wait_samples(2);
    let after = second.metrics();
    assert_eq!(net_of(&after, "alpha"), alpha_before, "alpha after restart");
    assert_eq!(
        pcie(&after, "alpha", "h2d"),
        7000,
        "alpha pcie after restart"
    );
    assert_eq!(
        net_of(&after, "gone"),
        gone_net,
        "folded tenant after restart"
    );
    assert_eq!(
        pcie(&after, "gone", "d2h"),
        999,
        "folded pcie after restart"
    );

    // And they keep counting from there.
    let r2 = network_workload(&alpha, w.0, w.1, w.2, w.3);
    cuda_in(&alpha, &["cuMemcpyHtoD_v2", "1000", "7"]);
    let later = settle(&second, "second agent counted more", |m| {
        net_of(m, "alpha").out_bytes >= alpha_before.out_bytes + w.0
            && pcie(m, "alpha", "h2d") >= 14000
    });
    assert_eq!(pcie(&later, "alpha", "h2d"), 14000, "no double count");
    let a = net_of(&later, "alpha");
    let delta = Net {
        in_bytes: a.in_bytes - alpha_before.in_bytes,
        in_packets: a.in_packets - alpha_before.in_packets,
        out_bytes: a.out_bytes - alpha_before.out_bytes,
        out_packets: a.out_packets - alpha_before.out_packets,
    };
    eprintln!("alpha before {alpha_before:?}\nalpha after {a:?}\ndelta {delta:?}");
    check_network("alpha (second run)", delta, w, r2);
    assert_eq!(net_of(&later, "gone"), gone_net);
}

#[test]
fn exited_process_keeps_its_cgroup_for_attribution() {
    if !require_root() {
        return;
    }
    let pin = PinDir::new();
    let state = tempfile::tempdir().unwrap();
    let base = Cgroup::create(&unique("tally-probes-exit"));
    let name = base.path.rsplit('/').next().unwrap().to_owned();
    let own = tally_e2e::own_unified_cgroup();
    let rel = base.path.trim_start_matches(own.trim_end_matches('/'));
    let short = Cgroup::create(&format!("{}/shortlived", rel.trim_start_matches('/')));

    let config = tally_agent::probes::ProbesConfig {
        network: false,
        pcie: false,
        process: true,
        cuda_libs: None,
        pin_dir: pin.0.clone(),
    };
    let mut probes = tally_agent::probes::Probes::start(&config, state.path());
    for s in probes.statuses() {
        if s.probe.starts_with("process_") {
            assert!(s.up, "{s:?}");
        }
    }
    let exited = probes.take_exited().expect("exited-process lookup");

    // The shell moves itself in and execs /bin/true: one pid, exec'd in
    // the cgroup, exited and reaped before we look.
    let mut child = short
        .command("/bin/true", &[])
        .stdin(Stdio::null())
        .spawn()
        .expect("run a short-lived process");
    let pid = child.id();
    assert!(child.wait().expect("wait").success());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still alive"
    );

    let rec = exited.record(pid).expect("the kernel recorded the pid");
    assert_ne!(rec.exit_ns, 0, "exit seen: {rec:?}");
    assert_ne!(rec.exec_ns, 0, "exec seen: {rec:?}");
    assert_eq!(rec.cgroup_id, short.id(), "cgroup at exit");
    assert_eq!(exited.cgroup_of(pid).as_deref(), Some(short.path.as_str()));

    // The tenant resolver falls back on it once /proc/PID is gone.
    let rules = tally_agent::config::Config::parse(
        &format!("[[tenant.rule]]\ncgroup = '/{name}/(?P<tenant>[^/]+)$'\n"),
        Path::new("t.toml"),
    )
    .unwrap()
    .tenant
    .rules;
    let mut resolver = tally_agent::tenants::Resolver::new(rules);
    assert_eq!(&*resolver.attribute(pid).tenant, "_unattributed");
    resolver.set_exited(Box::new(exited));
    let att = resolver.attribute(pid);
    assert_eq!(&*att.tenant, "shortlived", "{att:?}");
    drop(probes);
}

#[test]
fn unprivileged_agent_reports_probes_down_and_serves_gpu_metrics() {
    if !require_root() {
        // As root we can drop to `nobody`; as a normal user the test is the
        // same as running the agent, which the other suites do.
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        skip("setpriv (util-linux) not installed");
        return;
    }
    let node = SimNode::standard();
    let pin = PinDir::new();
    let state = tempfile::tempdir().unwrap();
    let config = probe_config(
        &unique("tally-probes-nobody"),
        &pin.0,
        state.path(),
        &[],
        "300ms",
    );
    let agent = start_agent_as_nobody(&node, &config);
    let m = agent.metrics();
    for probe in PROBES {
        assert_eq!(
            m.value("tally_probe_up", &[("probe", probe)]),
            Some(0.0),
            "{probe} as nobody; log:\n{}",
            agent.log_text()
        );
    }
    let snap = agent.snapshot();
    for p in snap["probes"].as_array().expect("probes in snapshot") {
        let err = p["error"].as_str().unwrap_or_default();
        assert!(
            refusal(err).is_some(),
            "reason names the refusal (EPERM or EACCES): {p}"
        );
        assert!(err.contains("CAP_BPF"), "reason says how to fix it: {p}");
    }
    assert!(
        m.sum("tally_gpu_info", &[]) >= 3.0,
        "GPU metrics still served; log:\n{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("probe not running"),
        "the agent logs why"
    );
    // Whether nobody may create the pin directory itself depends on how
    // bpffs was mounted: mode 1777 without options (`mount -t bpf`), 0700
    // under systemd and when the agent mounts it. Nothing may be pinned in
    // it either way.
    let pinned: Vec<_> = fs::read_dir(&pin.0)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(pinned.is_empty(), "nothing pinned as nobody: {pinned:?}");
}

#[test]
fn doctor_loads_every_probe_or_says_why_not() {
    if !require_root() {
        return;
    }
    let pin = PinDir::new();
    let state = tempfile::tempdir().unwrap();
    // Everything the doctor runs from, where `nobody` can read it too (the
    // checkout may be private); the simulator's node is opened up.
    let shared = SharedDir::new();
    let tally = shared.copy(&tally_e2e::tally_bin());
    let sim = shared.copy(&tally_e2e::sim_lib());
    let cuda = shared.copy(&fake_cuda().lib);
    let config = shared.write(
        "tally.toml",
        probe_config(
            &unique("tally-probes-doctor"),
            &pin.0,
            state.path(),
            &[&cuda],
            "1s",
        ),
    );
    let node = SimNode::standard();
    open_to_all(node.dir.path());
    let doctor = |mut cmd: Command| {
        let out = cmd
            .arg("doctor")
            .arg("--config")
            .arg(&config)
            .arg("--nvml-lib")
            .arg(&sim)
            .envs(node.env())
            .output()
            .expect("run tally doctor");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = doctor(Command::new(&tally));
    for probe in PROBES {
        assert!(
            text.contains(&format!("[ok  ] {probe}")),
            "{probe} not ok:\n{text}"
        );
    }
    assert!(
        !pin.0.exists(),
        "the doctor pins nothing in the agent's directory"
    );

    // As nobody the doctor says why each probe cannot load: the kernel's
    // refusal, EPERM or EACCES depending on its sysctls.
    open_to_all(state.path());
    let text = doctor(as_nobody(&tally));
    for probe in PROBES {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("] {probe} ")))
            .unwrap_or_else(|| panic!("no line for {probe}:\n{text}"));
        assert!(
            line.starts_with("[FAIL]") && refusal(line).is_some(),
            "{probe} fails naming the refusal (EPERM or EACCES): {line}"
        );
    }
}

#[test]
fn a_second_agent_on_the_same_pin_dir_does_not_attach_twice() {
    if !require_root() {
        return;
    }
    let s = setup("tally-probes-busy");
    let first = s.agent("500ms");
    // Same pin dir, own state dir: it must not count into the first one's maps.
    let state = tempfile::tempdir().unwrap();
    let config = probe_config(
        s.name(),
        &s.pin.0,
        state.path(),
        &[&fake_cuda().lib],
        "500ms",
    );
    let second = Agent::start(&s.node, &config, &[]);
    let snap = second.snapshot();
    for p in snap["probes"].as_array().expect("probes") {
        assert_eq!(p["up"], false, "{p}");
        let err = p["error"].as_str().unwrap_or_default();
        assert!(err.contains("another tally agent holds"), "{p}");
    }
    // The first keeps counting, once.
    let alpha = s.tenant("alpha");
    cuda_in(&alpha, &["cuMemcpyHtoD_v2", "4096", "3"]);
    let m = settle(&first, "first agent counted", |m| {
        pcie(m, "alpha", "h2d") >= 12288
    });
    assert_eq!(pcie(&m, "alpha", "h2d"), 12288);
    assert_eq!(pcie(&second.metrics(), "alpha", "h2d"), 0);
}

#[test]
fn counters_stay_when_the_maps_are_new_as_after_a_reboot() {
    if !require_root() {
        return;
    }
    let s = setup("tally-probes-reboot");
    let alpha = s.tenant("alpha");
    let first = Agent::start(&s.node, &s.config("300ms"), &[]);
    // The second agent starts on the same config file and address.
    let (config, addr) = (first.config.clone(), first.addr);
    cuda_in(&alpha, &["cuMemcpyDtoH_v2", "1000", "9"]);
    let w = (1u64 << 20, 1000u64, 20u64, 500u64);
    network_workload(&alpha, w.0, w.1, w.2, w.3);
    let before = settle(&first, "first agent counted", |m| {
        pcie(m, "alpha", "d2h") == 9000 && net_of(m, "alpha").out_bytes >= w.0
    });
    let net_before = net_of(&before, "alpha");
    drop(first);

    // A reboot empties bpffs: the maps come back new, the state file stays.
    for e in fs::read_dir(&s.pin.0).expect("pin dir").flatten() {
        fs::remove_file(e.path()).expect("unpin");
    }
    let second = Agent::start_with(&s.node, &config, addr, &[]);
    second.wait_samples(2);
    let after = second.metrics();
    assert_eq!(pcie(&after, "alpha", "d2h"), 9000, "pcie after new maps");
    assert_eq!(
        net_of(&after, "alpha"),
        net_before,
        "network after new maps"
    );

    cuda_in(&alpha, &["cuMemcpyDtoH_v2", "1000", "1"]);
    let later = settle(&second, "counting on", |m| pcie(m, "alpha", "d2h") >= 10000);
    assert_eq!(
        pcie(&later, "alpha", "d2h"),
        10000,
        "continues, no double count"
    );
}
