//! Benchmarks 4 and 5: what the eBPF probes cost the workloads they count —
//! loopback TCP with and without the `cgroup_skb` programs (and with the
//! policer configured but not limiting, where it has landed), and ns per
//! call of a fake-libcuda copy function with and without the uprobes.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tally_e2e::{
    Agent, Cgroup, Client, Metrics, SimNode, enforce_support::TenantEnv, free_port, unique,
};

use super::{
    Check, Ctx, Section, Verdict,
    util::{self, Proc, Stats},
};
use crate::exec::workspace_root;

/// The fake driver library and the program that calls it.
pub(super) struct FakeCuda {
    pub lib: PathBuf,
    pub caller: PathBuf,
}

/// Builds `tests/fake-libcuda` with the system C compiler, as the e2e
/// tests do (`tests/e2e/src/probes_support.rs`).
pub(super) fn fake_cuda() -> anyhow::Result<FakeCuda> {
    let src = workspace_root().join("tests/fake-libcuda");
    if !src.join("libcuda.c").exists() {
        bail!("tests/fake-libcuda has not landed");
    }
    let out = util::scratch("fake-libcuda")?;
    let lib = out.join("libcuda.so.1");
    let caller = out.join("cuda-copy");
    cc(&[
        "-shared",
        "-fPIC",
        "-O0",
        "-fno-ipa-icf",
        "-Wall",
        "-Wl,-soname,libcuda.so.1",
        "-o",
        &lib.display().to_string(),
        &src.join("libcuda.c").display().to_string(),
    ])?;
    cc(&[
        "-O2",
        "-Wall",
        "-o",
        &caller.display().to_string(),
        &src.join("cuda-copy.c").display().to_string(),
        "-ldl",
    ])?;
    Ok(FakeCuda { lib, caller })
}

fn cc(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("cc").args(args).output().context("run cc")?;
    if !out.status.success() {
        bail!("cc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// An agent with only some probes on, for an A/B arm.
struct ProbeAgent {
    agent: Agent,
    client: Client,
    pin: PathBuf,
    _node: SimNode,
}

impl ProbeAgent {
    fn metrics(&self) -> Option<Metrics> {
        let r = self.client.get("/metrics").ok()?;
        Metrics::try_parse(&r.text()).ok()
    }
}

impl Drop for ProbeAgent {
    fn drop(&mut self) {
        self.agent.child.kill();
        util::remove_pins(&self.pin);
    }
}

/// Starts the agent with `[probes]` `probes_toml` and extra config, on an
/// empty simulated node; waits until ready.
fn probe_agent(
    ctx: &Ctx,
    dir: &Path,
    probes_toml: &str,
    extra: &str,
) -> anyhow::Result<ProbeAgent> {
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/tally-bench-probes-{}",
        std::process::id()
    ));
    util::remove_pins(&pin);
    let node = SimNode::in_dir(
        dir,
        "[[gpu]]\nmodel = \"NVIDIA H100 80GB HBM3\"\nmemory_mib = 81559\npower_idle_w = 70\npower_max_w = 700\n",
    );
    let config = format!(
        "[agent]\nstate_dir = \"{}\"\n\n[probes]\npin_dir = \"{}\"\n{probes_toml}\n\n\
         [[tenant.rule]]\ncgroup = '/tally/(?P<tenant>[^/]+)/'\n{extra}\n",
        dir.join("agent-state").display(),
        pin.display()
    );
    let file = dir.join("tally.toml");
    fs::write(&file, config)?;
    let check = Command::new(&ctx.tally)
        .args(["config", "check"])
        .arg(&file)
        .output()?;
    if !check.status.success() {
        bail!(
            "config refused: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = Agent::launch(
        &ctx.launch(Duration::from_secs(60)),
        &node,
        &file,
        addr,
        &[],
    );
    Ok(ProbeAgent {
        agent,
        client: Client::new(addr),
        pin,
        _node: node,
    })
}

fn probe_up(agent: &ProbeAgent, probe: &str) -> bool {
    agent
        .metrics()
        .is_some_and(|m| m.value("tally_probe_up", &[("probe", probe)]) == Some(1.0))
}

// ------------------------------------------------------------- 4. network

/// Waits until the policer polices: the client's cgroup is in the map its
/// program reads (the enforcer writes it after a walk of the tree, a
/// sample or two after start), so no policer run measures the counters
/// alone.
fn wait_policing(agent: &ProbeAgent) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally_e2e::probes_support::policed_cgroups(&agent.pin).unwrap_or(0) == 0 {
        if Instant::now() > deadline {
            bail!(
                "the policer's cgroup entries never appeared in {}",
                agent.pin.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Arm {
    NoAgent,
    Without,
    With,
    Policer,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::NoAgent => "no agent at all",
            Arm::Without => "agent, network probe off (baseline)",
            Arm::With => "cgroup_skb counters",
            Arm::Policer => "counters + policer (not limiting)",
        }
    }
}

pub(super) fn network(ctx: &Ctx) -> anyhow::Result<Section> {
    let dir = util::scratch("network")?;
    let tree = Cgroup::create(&unique("tally-bench-net"));
    let server_cg = tree.child("tally/net-server/iperf");
    let client_cg = tree.child("tally/net-client/iperf");
    let port = free_port();
    let server = Proc::spawn(
        "iperf3 -s",
        server_cg
            .command("iperf3", &["-s", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    std::thread::sleep(Duration::from_millis(500));

    // The policer arm runs where the policer has landed: a quota the
    // config accepts and a token bucket in the egress program.
    let policer_src =
        fs::read_to_string(workspace_root().join("ebpf/net.bpf.c")).unwrap_or_default();
    let policer_landed = policer_src.contains("bucket") || policer_src.contains("police");
    // The quota makes the enforcer's tenant cgroups on every hierarchy:
    // beneath a parent of the bench's own, removed when `quota_tree` drops.
    let quota_tree = TenantEnv::named("tally-bench-quota");
    let quota = &quota_tree.tenant_section(
        "[tenant.quota.net-client]\nnetwork_egress = \"100Gbit\"\nnetwork_ingress = \"100Gbit\"\n",
    );

    // At least ten rounds: each gives one A/B pair per arm, and the median
    // of the paired ratios is what the verdict reads (the rule).
    // Sixteen shorter rounds rather than ten: the pairs sit closer in time
    // and the median of more of them moves less with this VM's noise.
    let (pairs, secs) = if ctx.quick { (2, 2) } else { (16, 3) };
    let mut arms = vec![Arm::NoAgent, Arm::Without, Arm::With];
    // Per counting arm: program runs and nanoseconds in the statistics pass.
    let mut per_arm: Vec<(Arm, u64, u64)> = Vec::new();
    if policer_landed {
        arms.push(Arm::Policer);
    }
    let mut results: Vec<(usize, Arm, f64)> = Vec::new();
    // One client run of `secs`: Gbit/s received.
    let iperf = |secs: u64| -> anyhow::Result<f64> {
        let out = client_cg
            .command(
                "iperf3",
                &[
                    "-c",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-t",
                    &secs.to_string(),
                    // Client on CPU 0, server on CPU 1, in every run: where
                    // the scheduler puts the two ends (apart or together)
                    // moved a run's rate more than any probe.
                    "-A",
                    "0,1",
                    "-J",
                ],
            )
            .stderr(Stdio::null())
            .output()
            .context("run iperf3 -c")?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
        let bps = json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("no end.sum_received in iperf3 output: {}", json["error"]))?;
        Ok(bps / 1e9)
    };
    let mut attached = Vec::new();
    let mut counted = 0.0f64;
    let mut policer_note = if policer_landed {
        String::new()
    } else {
        "The policer arm is skipped: `ebpf/net.bpf.c` has no token bucket yet (the enforcement \
         work has not landed it)."
            .to_owned()
    };
    for round in 0..pairs {
        // Alternate the order each round so that drift hits every arm alike.
        let mut order = arms.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for arm in order {
            let agent = match arm {
                Arm::NoAgent => None,
                Arm::Without => Some(probe_agent(
                    ctx,
                    &dir,
                    "network = false\npcie = false\nprocess = false",
                    "",
                )?),
                Arm::With => Some(probe_agent(
                    ctx,
                    &dir,
                    "network = true\npcie = false\nprocess = false",
                    "",
                )?),
                Arm::Policer => match probe_agent(
                    ctx,
                    &dir,
                    "network = true\npcie = false\nprocess = false",
                    quota,
                ) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        policer_note = format!("The policer arm could not run: {e:#}");
                        arms.retain(|a| *a != Arm::Policer);
                        continue;
                    }
                },
            };
            let counting = matches!(arm, Arm::With | Arm::Policer);
            if let Some(a) = &agent
                && counting
                && !probe_up(a, "network_egress")
            {
                bail!("the agent's network probes are not up (tally_probe_up)");
            }
            if let (Some(a), Arm::Policer) = (&agent, arm) {
                wait_policing(a)?;
            }
            let programs = util::root_programs(tree.mount());
            attached.push((arm, programs));
            results.push((round, arm, iperf(secs)?));
            if let Some(a) = &agent {
                std::thread::sleep(Duration::from_millis(1200));
                if let Some(m) = a.metrics() {
                    let v = m.sum(
                        "tally_tenant_network_bytes_total",
                        &[("tenant", "net-client")],
                    );
                    counted = counted.max(v);
                }
            }
            drop(agent);
        }
    }
    // The kernel's run-time statistics cost two clock reads per program
    // run, which production does not pay: they are on only for this pass,
    // one run of each counting arm after the A/B rounds.
    if let Some(stats) = util::BpfStats::enable() {
        for arm in arms
            .iter()
            .filter(|a| matches!(a, Arm::With | Arm::Policer))
        {
            let quota = if *arm == Arm::Policer { quota } else { "" };
            let agent = probe_agent(
                ctx,
                &dir,
                "network = true\npcie = false\nprocess = false",
                quota,
            )?;
            // A probe that failed to attach would read as 0 ns, not an error.
            if !probe_up(&agent, "network_egress") {
                bail!("the agent's network probes are not up in the statistics pass");
            }
            if *arm == Arm::Policer {
                wait_policing(&agent)?;
            }
            let (c0, t0) = stats.read("cgroup_skb");
            iperf(secs)?;
            let (c1, t1) = stats.read("cgroup_skb");
            let (runs, ns) = (c1.saturating_sub(c0), t1.saturating_sub(t0));
            per_arm.push((*arm, runs, ns));
        }
    }
    drop(server);
    // Over the whole pass: runs and nanoseconds, and how many client runs.
    let bpf = per_arm
        .iter()
        .fold((0u64, 0u64), |(c, t), (_, runs, ns)| (c + runs, t + ns));
    let stats_runs = per_arm.len() as u64;

    let stats = |arm: Arm| {
        Stats::of(
            &results
                .iter()
                .filter(|(_, a, _)| *a == arm)
                .map(|(_, _, v)| *v)
                .collect::<Vec<_>>(),
        )
    };
    // `arm` against the baseline run of the same round.
    let paired = |arm: Arm| {
        let ratios: Vec<f64> = (0..pairs)
            .filter_map(|round| {
                let of = |want: Arm| {
                    results
                        .iter()
                        .find(|(r, a, _)| *r == round && *a == want)
                        .map(|(_, _, v)| *v)
                };
                Some(of(arm)? / of(Arm::Without)?)
            })
            .collect();
        Stats::of(&ratios)
    };
    let base = stats(Arm::Without);
    let mut s = Section {
        title: "4. Network probe cost".into(),
        ..Default::default()
    };
    let b = &mut s.body;
    let _ = writeln!(
        b,
        "**Set-up.** `iperf3` (Debian) server and client over loopback TCP, each in its own \
         tenant cgroup, the client on CPU 0 and the server on CPU 1 in every run (`-A 0,1`: \
         left to the scheduler, the two ends sharing a CPU or not moved a run's rate by up \
         to half). Arms: the release agent with every probe off (the baseline: same \
         processes and threads running, no programs attached); the agent with only the network \
         probe (`cgroup_skb` ingress + egress at the cgroup v2 root, counting per cgroup in a \
         per-CPU hash map){}; and, for reference, no agent at all. {pairs} rounds of {secs} s \
         per arm, the order alternating each round; the agent is started for its arm and \
         stopped after it (pins removed). Each round pairs every arm with the baseline run of \
         that round; the verdict reads the median of those paired ratios. Programs attached at the v2 root per run (bpftool): \
         {}. The agent counted {:.2} GB for the client tenant in its last run (proof the \
         programs were on the path). The A/B rounds run with `kernel.bpf_stats_enabled` off, \
         as in production; a pass after them, one run of each counting arm with it on, counted \
         the `cgroup_skb` programs {} times at **{:.0} ns per run** on average ({}).\n",
        if policer_landed {
            "; the same plus a 100 Gbit/s egress/ingress quota for the client's tenant (policer \
             on, never limiting; measured once the client's cgroup is in the policer's map)"
        } else {
            ""
        },
        attached
            .iter()
            .map(|(a, p)| format!("{}={}", a.name(), p.map_or("?".into(), |n| n.to_string())))
            .collect::<Vec<_>>()
            .join(", "),
        counted / 1e9,
        bpf.0,
        bpf.1 as f64 / bpf.0.max(1) as f64,
        per_arm
            .iter()
            .map(|(arm, runs, ns)| format!(
                "{}: {:.0} ns",
                arm.name(),
                *ns as f64 / (*runs).max(1) as f64
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let bpf_ns = bpf.1 as f64 / bpf.0.max(1) as f64;
    let _ = writeln!(
        b,
        "| arm | Gbit/s, median (min–max) | runs | paired ratio to the baseline, median (min–max) |"
    );
    let _ = writeln!(b, "| --- | --- | --- | --- |");
    for arm in [Arm::Without, Arm::With, Arm::Policer, Arm::NoAgent] {
        let st = stats(arm);
        if st.n == 0 {
            continue;
        }
        let pr = paired(arm);
        let _ = writeln!(
            b,
            "| {} | {} | {} | {:.1} % ({:.1}–{:.1}) |",
            arm.name(),
            st.show(2),
            st.n,
            pr.median * 100.0,
            pr.min * 100.0,
            pr.max * 100.0
        );
        if matches!(arm, Arm::With | Arm::Policer) {
            // This arm's own run time where the statistics pass measured it.
            let bpf_ns = per_arm
                .iter()
                .find(|(a, _, _)| *a == arm)
                .map_or(bpf_ns, |(_, runs, ns)| *ns as f64 / (*runs).max(1) as f64);
            s.checks.push(Check::new(
                format!("4. loopback TCP with {}", arm.name()),
                "≥ 98 % of the probe-off baseline",
                format!(
                    "{:.1} % median of {} paired ratios ({:.2} vs {:.2} Gbit/s); BPF {bpf_ns:.0} ns per run",
                    pr.median * 100.0,
                    pr.n,
                    st.median,
                    base.median
                ),
                Verdict::of(pr.median >= 0.98),
            ));
        }
    }
    // What the programs cost, from the kernel's own run-time statistics:
    // share of one core they took while the counting arms ran.
    if bpf.0 > 0 && stats_runs > 0 {
        let secs_total = (stats_runs * secs) as f64;
        let core_share = bpf.1 as f64 / 1e9 / secs_total * 100.0;
        let with = stats(Arm::With);
        let _ = writeln!(
            b,
            "\nFrom those statistics the programs took **{core_share:.2} % of one core** (the \
             statistics' own clock reads included) while \
             iperf3 moved ~{:.0} Gbit/s ({:.0} program runs per second). A loopback transfer is \
             CPU-bound on both ends, so the throughput it can lose to the programs is about that \
             share of the two cores busy with it: ~{:.1} %. The A/B medians above move by more \
             than that from run to run on this shared 2-core VM (the baseline alone spans \
             {:.1}–{:.1} Gbit/s): the verdict uses their ratio as the issue asks, but a ratio a \
             few percent either side of 100 % is within this machine's noise, and the estimate \
             from the kernel's statistics is the sharper measure of the programs' cost.",
            with.median,
            bpf.0 as f64 / secs_total,
            core_share / 2.0,
            base.min,
            base.max
        );
    }
    let none = stats(Arm::NoAgent);
    if none.n > 0 && none.median < 0.9 * base.median {
        let _ = writeln!(
            b,
            "\nThe *no agent* arm is for reference only. Loopback TCP was slower with no agent \
             running than with an agent whose probes are all off — probably because on this VM \
             the agent's threads (the simulator's XID poll every 20 ms) keep the vCPUs from \
             idling, which shortens wake-ups for the iperf3 ping-pong. So the probe's cost is \
             read between the agent's arms only."
        );
    }
    if !policer_note.is_empty() {
        let _ = writeln!(b, "\n{policer_note}");
        b.push('\n');
        s.checks.push(Check::new(
            "4. loopback TCP with the policer on",
            "≥ 98 % of without",
            policer_note.clone(),
            Verdict::Skipped,
        ));
    }
    Ok(s)
}

// -------------------------------------------------------------- 5. uprobe

pub(super) fn uprobe(ctx: &Ctx) -> anyhow::Result<Section> {
    let cuda = fake_cuda()?;
    let dir = util::scratch("uprobe")?;
    let tree = Cgroup::create(&unique("tally-bench-uprobe"));
    let cg = tree.child("tally/copier/job");
    let (pairs, calls): (usize, u64) = if ctx.quick {
        (1, 200_000)
    } else {
        (5, 2_000_000)
    };
    let size = 4096u64;
    let run_calls = |n: u64| -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = cg
            .command(
                &cuda.caller,
                &[
                    &cuda.lib.display().to_string(),
                    "cuMemcpyHtoD_v2",
                    &size.to_string(),
                    &n.to_string(),
                ],
            )
            .output()?;
        if !out.status.success() {
            bail!("cuda-copy failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(t.elapsed().as_secs_f64())
    };
    // Process start-up, dlopen and cgroup move, to subtract.
    let startup = Stats::of(
        &(0..5)
            .map(|_| run_calls(1))
            .collect::<anyhow::Result<Vec<_>>>()?,
    )
    .median;
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut counted = 0.0;
    let bpf_stats = util::BpfStats::enable();
    let mut bpf = (0u64, 0u64);
    for round in 0..pairs {
        for probed in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let agent = if probed {
                let a = probe_agent(
                    ctx,
                    &dir,
                    &format!(
                        "network = false\npcie = true\nprocess = false\ncuda_libs = [{:?}]",
                        cuda.lib.display().to_string()
                    ),
                    "",
                )?;
                if !probe_up(&a, "pcie_uprobes") {
                    bail!("the agent's pcie uprobes are not up (tally_probe_up)");
                }
                Some(a)
            } else {
                None
            };
            let bpf0 = bpf_stats.as_ref().map(|s| s.read("kprobe"));
            let secs = run_calls(calls)? - startup;
            if let (Some(s), Some((c0, t0)), true) = (&bpf_stats, bpf0, probed) {
                let (c1, t1) = s.read("kprobe");
                bpf.0 += c1.saturating_sub(c0);
                bpf.1 += t1.saturating_sub(t0);
            }
            let ns = secs * 1e9 / calls as f64;
            if let Some(a) = &agent {
                with.push(ns);
                std::thread::sleep(Duration::from_millis(1200));
                if let Some(m) = a.metrics() {
                    counted = m.sum("tally_tenant_pcie_bytes_total", &[]);
                }
            } else {
                without.push(ns);
            }
        }
    }
    let (w, wo) = (Stats::of(&with), Stats::of(&without));
    let added = w.median - wo.median;
    let bpf_ns = bpf.1 as f64 / bpf.0.max(1) as f64;
    let mut s = Section {
        title: "5. uprobe cost".into(),
        ..Default::default()
    };
    let b = &mut s.body;
    let _ = writeln!(
        b,
        "**Set-up.** `tests/fake-libcuda` built with `cc` (as the e2e tests build it); \
         `cuda-copy` calls `cuMemcpyHtoD_v2` ({size} bytes) {calls} times in a tenant cgroup. \
         Arms: no agent; the release agent with only the pcie probe (uprobes on the whole \
         `cuMemcpy*` family of that library). {pairs} rounds, order alternating. ns per call = \
         (wall time − median start-up of a 1-call run, {:.1} ms) / calls. The agent counted \
         {:.0} bytes in its last arm ({} expected per run: proof the uprobe fired on every \
         call).\n",
        startup * 1000.0,
        counted,
        calls * size
    );
    let _ = writeln!(b, "| arm | ns per call, median (min–max) | runs |");
    let _ = writeln!(b, "| --- | --- | --- |");
    let _ = writeln!(b, "| no uprobes | {} | {} |", wo.show(1), wo.n);
    let _ = writeln!(b, "| uprobes attached | {} | {} |", w.show(1), w.n);
    let _ = writeln!(
        b,
        "\nAdded by the uprobe: **{added:.0} ns per call** (median with − median without). Of \
         that, the BPF program itself ran {} times at {bpf_ns:.0} ns per run \
         (`kernel.bpf_stats_enabled`); the rest is the uprobe mechanism: the `int3` trap into \
         the kernel, the uprobe lookup, and single-stepping the displaced instruction out of \
         line — an exception round trip that costs more on a VM.\n",
        bpf.0
    );
    s.checks.push(Check::new(
        "5. uprobe added per copy call",
        "≤ 2 µs",
        format!(
            "{:.2} µs ({:.0} vs {:.0} ns)",
            added / 1000.0,
            w.median,
            wo.median
        ),
        Verdict::of(added <= 2000.0),
    ));
    if added > 2000.0 {
        let _ = writeln!(
            s.body,
            "**Bottleneck (uprobe).** Not the program ({bpf_ns:.0} ns of the {added:.0} ns): the \
             trap. Nothing in `ebpf/pcie.bpf.c` would win it back. What would: the kernel's \
             optimized x86 uprobes (a 5-byte `nop` at the probed address turned into a `call` \
             into a trampoline, no trap; needs a kernel with that support and entry points \
             that begin with a 5-byte nop, which real drivers' functions do not), or probing \
             fewer, bigger events. For scale: a 4 KiB host→device copy is itself microseconds \
             on a real GPU, and real workloads copy megabytes per call, so ~2 µs per call is a \
             small share of any real copy.\n"
        );
    }
    Ok(s)
}
