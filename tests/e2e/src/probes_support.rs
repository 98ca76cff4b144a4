//! Fixtures of the eBPF probe tests (`tests/probes.rs`): the fake libcuda,
//! a private bpffs pin directory, loopback peers, and an agent run as an
//! unprivileged user.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use crate::{
    ChildGuard, SimNode, free_port, http_get,
    other_user::{SharedDir, as_nobody, open_to_all},
    sim_lib, tally_bin, unique, wait_for,
};

/// The fake driver library and the program that calls it, built once per
/// test process with the system C compiler (`cc`) from
/// `tests/fake-libcuda/` into a directory under the target dir.
pub struct FakeCuda {
    /// `libcuda.so.1` exporting the `cuMemcpy*` family.
    pub lib: PathBuf,
    /// `cuda-copy LIB SYMBOL[@h2d|@d2h] BYTES COUNT...`.
    pub caller: PathBuf,
    /// `netload` (`tests/e2e/helpers/netload.c`): loopback TCP/UDP of
    /// known size that reports its retransmitted bytes.
    pub netload: PathBuf,
}

/// Builds (once per process) and returns the fake libcuda, its caller and
/// `netload`, in a directory under the target dir.
pub fn fake_cuda() -> &'static FakeCuda {
    static BUILT: OnceLock<FakeCuda> = OnceLock::new();
    BUILT.get_or_init(|| {
        // One directory per version of the sources, built aside and renamed
        // into place, so concurrent test processes neither race nor litter.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for src in [
            "../fake-libcuda/libcuda.c",
            "../fake-libcuda/cuda-copy.c",
            "helpers/netload.c",
        ] {
            for b in fs::read(root.join(src)).expect("read helper source") {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        let out = crate::target_dir().join(format!("fake-libcuda-{hash:016x}"));
        if !out.join("netload").exists() {
            let tmp = crate::target_dir().join(unique("fake-libcuda-build"));
            build_helpers(&tmp);
            if fs::rename(&tmp, &out).is_err() {
                // Another process got there first.
                let _ = fs::remove_dir_all(&tmp);
            }
        }
        FakeCuda {
            lib: out.join("libcuda.so.1"),
            caller: out.join("cuda-copy"),
            netload: out.join("netload"),
        }
    })
}

/// Compiles `tests/fake-libcuda/*.c` and `tests/e2e/helpers/netload.c`
/// with the system C compiler (`cc`) into `out`.
pub fn build_helpers(out: &Path) -> FakeCuda {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fake-libcuda");
    fs::create_dir_all(out).expect("helpers output dir");
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
        lib.to_str().unwrap(),
        src.join("libcuda.c").to_str().unwrap(),
    ]);
    cc(&[
        "-O2",
        "-Wall",
        "-o",
        caller.to_str().unwrap(),
        src.join("cuda-copy.c").to_str().unwrap(),
        "-ldl",
    ]);
    let netload = out.join("netload");
    cc(&[
        "-O2",
        "-Wall",
        "-o",
        netload.to_str().unwrap(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("helpers/netload.c")
            .to_str()
            .unwrap(),
    ]);
    FakeCuda {
        lib,
        caller,
        netload,
    }
}

fn cc(args: &[&str]) {
    let out = Command::new("cc")
        .args(args)
        .output()
        .expect("run cc (install gcc: apt-get install gcc)");
    assert!(
        out.status.success(),
        "cc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bpffs directory of its own for one test's agent, so tests do not
/// share maps with each other or with a real agent; removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> PinDir {
        PinDir(PathBuf::from("/sys/fs/bpf").join(unique("tally-e2e")))
    }

    /// [`policed_cgroups`] in this directory, which must hold the map.
    pub fn policed_cgroups(&self) -> usize {
        policed_cgroups(&self.0).expect("open the pinned tally_cgroup_tenant map")
    }
}

/// Entries of the network policer's `tally_cgroup_tenant` map pinned in
/// `pin_dir`: the cgroups whose packets spend a tenant's bucket. `None`
/// while the map is not pinned there (or is not that map).
pub fn policed_cgroups(pin_dir: &Path) -> Option<usize> {
    use aya::maps::{HashMap, Map, MapData};

    let data = MapData::from_pin(pin_dir.join("tally_cgroup_tenant")).ok()?;
    let map: HashMap<MapData, u64, u64> = HashMap::try_from(Map::from_map_data(data).ok()?).ok()?;
    Some(map.keys().flatten().count())
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(&self.0);
    }
}

/// Agent config for probe tests: tenants are the cgroups directly below
/// a directory named `base`; maps pinned in `pin`; state in `state_dir`.
pub fn probe_config(
    base: &str,
    pin: &Path,
    state_dir: &Path,
    cuda_libs: &[&Path],
    interval: &str,
) -> String {
    let libs: Vec<String> = cuda_libs
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    format!(
        r#"
[agent]
sample_interval = "{interval}"
state_dir = "{state}"

[probes]
pin_dir = "{pin}"
cuda_libs = [{libs}]

[[tenant.rule]]
cgroup = '/{base}/(?P<tenant>[^/]+)$'
"#,
        state = state_dir.display(),
        pin = pin.display(),
        libs = libs.join(", "),
    )
}

/// A `netload tcp-serve` in this process's cgroup (no tenant's): accepts
/// one connection, reads `read` bytes, writes `write` bytes back.
pub struct TcpServer {
    child: ChildGuard,
    pub addr: SocketAddr,
}

impl TcpServer {
    pub fn start(read: u64, write: u64) -> TcpServer {
        Self::start_with(&fake_cuda().netload, read, write)
    }

    /// As [`TcpServer::start`], with a given `netload` binary.
    pub fn start_with(netload: &Path, read: u64, write: u64) -> TcpServer {
        let mut child = ChildGuard(
            Command::new(netload)
                .args(["tcp-serve", &read.to_string(), &write.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn netload tcp-serve"),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.as_mut().expect("piped"))
            .read_line(&mut line)
            .expect("read port");
        let port: u16 = line
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("netload tcp-serve said {line:?}"));
        TcpServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// Waits for the exchange to end; the bytes the server retransmitted.
    pub fn finish(mut self) -> u64 {
        let mut rest = String::new();
        self.child
            .0
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut rest)
            .expect("read netload output");
        let status = self.child.0.wait().expect("wait netload");
        assert!(status.success(), "netload tcp-serve failed: {status}");
        retrans(&rest)
    }
}

/// The `retrans N` line of netload's output.
pub fn retrans(output: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix("retrans ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no retrans line in {output:?}"))
}

/// A UDP socket on 127.0.0.1 to send datagrams to (never read: the
/// sender's egress counts whatever the receiver does).
pub fn udp_sink() -> (SocketAddr, UdpSocket) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp sink");
    (s.local_addr().unwrap(), s)
}

/// A `tally agent` run as `nobody`, with the world-readable copies of what
/// it runs from; derefs to the [`Agent`](crate::Agent).
pub struct NobodyAgent {
    // Fields drop in order: the agent is killed before its files go.
    agent: crate::Agent,
    _shared: SharedDir,
}

impl std::ops::Deref for NobodyAgent {
    type Target = crate::Agent;
    fn deref(&self) -> &crate::Agent {
        &self.agent
    }
}

/// Starts `tally agent` as user `nobody` (no supplementary groups, no
/// capabilities) through `setpriv`, from copies of the binary, the
/// simulator and the config in a [`SharedDir`] (the checkout may be
/// private); waits for `/readyz`.
pub fn start_agent_as_nobody(node: &SimNode, config_toml: &str) -> NobodyAgent {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let shared = SharedDir::new();
    let tally = shared.copy(&tally_bin());
    let sim = shared.copy(&sim_lib());
    let config = shared.write("agent.toml", config_toml);
    let log = node.dir.path().join(unique("agent") + ".log");
    // The simulator's scenario and state stay in the node's directory: the
    // test keeps changing them while the agent runs.
    open_to_all(node.dir.path());
    let mut cmd = as_nobody(&tally);
    cmd.arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--nvml-lib")
        .arg(&sim)
        .envs(node.env())
        .env("TALLY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("agent log"));
    let agent = crate::Agent {
        child: ChildGuard(cmd.spawn().expect("spawn setpriv tally agent")),
        addr,
        config,
        log,
        netns: None,
    };
    wait_for(
        "unprivileged agent /readyz",
        Duration::from_secs(60),
        || {
            assert!(
                !agent.child.has_exited(),
                "the agent as nobody exited; log:\n{}",
                agent.log_text()
            );
            matches!(http_get(agent.addr, "/readyz"), Ok((200, _))).then_some(())
        },
    );
    NobodyAgent {
        agent,
        _shared: shared,
    }
}
