//! The running agent: the sampling loop and the HTTP endpoints.
//!
//! One thread samples (NVML and kernel maps block; they never run on the
//! async runtime) and publishes an immutable [`Snapshot`] through a watch
//! channel; every output reads the latest one.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, VARY},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use crate::{
    config::Config,
    gpu::Sampler,
    metrics::{self, Metrics},
    report::ReportStats,
    snapshot::{Latest, Snapshot},
    state_lock::{self, StateLock},
    tenants::Resolver,
};

/// Everything the agent needs to run, after flags override the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub listen: SocketAddr,
    pub sample_interval: Duration,
    pub nvml_lib: PathBuf,
    pub node: String,
}

impl Settings {
    /// Node name: `[agent] node`, else the host name.
    pub fn node_name(config: &Config) -> String {
        config.agent.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into())
        })
    }
}

/// A running agent: the sampling thread and the report sender; the binary
/// serves [`Agent::route`] until shutdown.
#[derive(Debug)]
pub struct Agent {
    latest: Latest,
    metrics: Arc<Metrics>,
    /// Why `/readyz` says no although the process is healthy: another
    /// agent holds the state directory ([`crate::state_lock`]).
    waiting: Arc<Mutex<Option<String>>>,
    work: Work,
}

/// The sampler and the sender: running, or to be started once the state
/// directory's lock is ours.
#[derive(Debug)]
enum Work {
    Running(Running),
    Waiting(tokio::task::JoinHandle<Option<Running>>),
}

#[derive(Debug)]
struct Running {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
    reporter: Option<tokio::task::JoinHandle<()>>,
    /// Held until the final report is spooled and the sampler is done.
    _lock: Option<StateLock>,
}

impl Agent {
    /// Starts sampling (on a thread of its own) and reporting; both stop
    /// when `shutdown` is cancelled and [`Agent::stopped`] is awaited.
    /// While another agent holds the state directory, both wait for it
    /// and `/readyz` says so; `/healthz` and `/metrics` are served.
    pub fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Agent> {
        info!(listen = %settings.listen, node = %settings.node, "agent serving /metrics, /healthz, /readyz, /api/v1/snapshot");
        // Before any tenant cgroup is made: out of a delegated root.
        crate::enforce::cgroup::delegate::settle();
        let (tx, latest) = watch::channel(Arc::new(Snapshot {
            node: settings.node.clone(),
            ..Default::default()
        }));
        let waiting = Arc::new(Mutex::new(None));
        let mut metrics = Metrics::new(latest.clone());
        // The sender's counters are registered now, so that /metrics has
        // them from the start even while the agent waits for its lock.
        let stats = ReportStats::default();
        if settings.config.report.aggregator.is_some() {
            stats.register(metrics.registry());
        }
        let metrics = Arc::new(metrics);
        metrics::encode_ahead(metrics.clone(), latest.clone(), settings.sample_interval);
        let state_dir = settings.config.agent.state_dir.clone();
        // Only an agent that writes shared state there (the report spool and
        // state, the enforcement audit log) needs the directory to itself;
        // the probes' state is already guarded by the pin directory's lock.
        let shares_state = settings.config.report.aggregator.is_some()
            || !settings.config.tenant.quotas.is_empty();
        let lock = if shares_state {
            match state_lock::try_lock(&state_dir) {
                Ok(l) => l.map(Some),
                Err(e) => {
                    // As before the lock existed: the sender reports the
                    // unusable directory itself.
                    warn!(error = %e, state_dir = %state_dir.display(), "cannot lock the state directory; running without the lock");
                    Ok(None)
                }
            }
        } else {
            Ok(None)
        };
        let work = match lock {
            Ok(lock) => Work::Running(Running::start(
                settings,
                tx,
                latest.clone(),
                stats,
                lock,
                shutdown,
            )?),
            Err(busy) => {
                let reason = busy.reason();
                warn!(state_dir = %state_dir.display(), "{reason}: one agent per state directory; neither sampling nor reporting until it exits");
                *waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                let (waiting, latest) = (waiting.clone(), latest.clone());
                Work::Waiting(tokio::spawn(async move {
                    let lock = match busy.wait(&shutdown).await? {
                        Ok(l) => l,
                        Err(e) => {
                            error!(error = %e, "cannot take the state directory lock; not sampling");
                            return None;
                        }
                    };
                    info!(state_dir = %state_dir.display(), "took the state directory lock over; starting");
                    let running = Running::start(settings, tx, latest, stats, Some(lock), shutdown);
                    *waiting.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    running
                        .map_err(|e| error!(error = %e, "cannot start after taking the lock"))
                        .ok()
                }))
            }
        };
        Ok(Agent {
            latest,
            metrics,
            waiting,
            work,
        })
    }

    /// The request handler of `/metrics`, `/healthz`, `/readyz` and
    /// `/api/v1/snapshot`: reads the latest snapshot, never NVML.
    pub fn route(
        &self,
    ) -> impl Fn(Request<Incoming>) -> std::future::Ready<Response<Body>> + Send + Sync + 'static
    {
        let latest = self.latest.clone();
        let metrics = self.metrics.clone();
        let waiting = self.waiting.clone();
        move |req| std::future::ready(route(&req, &latest, &metrics, &waiting))
    }

    /// The latest snapshot, as the sampler publishes it (readiness and the
    /// service manager's watchdog follow it).
    pub fn latest(&self) -> Latest {
        self.latest.clone()
    }

    /// Waits for the final report, then stops sampling.
    pub async fn stopped(self) {
        let running = match self.work {
            Work::Running(r) => Some(r),
            Work::Waiting(task) => task.await.ok().flatten(),
        };
        if let Some(r) = running {
            r.stopped().await;
        }
        info!("agent stopped");
    }
}

impl Running {
    fn start(
        settings: Settings,
        tx: watch::Sender<Arc<Snapshot>>,
        latest: Latest,
        stats: ReportStats,
        lock: Option<StateLock>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            let settings = settings.clone();
            std::thread::Builder::new()
                .name("tally-sampler".into())
                .spawn(move || sample_loop(settings, tx, stop))?
        };
        // Reports to the aggregator (when configured); on shutdown it cuts
        // the final partial interval before the agent exits.
        let reporter = crate::report::spawn(
            &settings.config.report,
            &settings.node,
            &settings.config.agent.state_dir,
            latest,
            stats,
            shutdown,
        )?;
        Ok(Running {
            stop,
            sampler,
            reporter,
            _lock: lock,
        })
    }

    async fn stopped(self) {
        if let Some(reporter) = self.reporter
            && reporter.await.is_err()
        {
            error!("the report sender panicked");
        }
        self.stop.store(true, Ordering::Relaxed);
        // It sleeps parked between cycles: wake it to see `stop`.
        self.sampler.thread().unpark();
        if self.sampler.join().is_err() {
            error!("the sampling thread panicked");
        }
    }
}

/// Samples every `sample_interval` on a fixed schedule until `stop`.
fn sample_loop(settings: Settings, tx: watch::Sender<Arc<Snapshot>>, stop: Arc<AtomicBool>) {
    let _span = info_span!("sampler", node = %settings.node).entered();
    let mut resolver = Resolver::new(settings.config.tenant.rules.clone());
    // Kubernetes pods: the kubelet is asked on a thread of its own; stops on drop.
    let _kubelet = resolver.attach_kubernetes(&settings.config.tenant.kubernetes);
    let mut gpus = Sampler::new(
        settings.nvml_lib.clone(),
        settings.config.states.clone(),
        stop.clone(),
    )
    .with_timeout(settings.config.agent.nvml_timeout);
    // Quotas: acts on each snapshot without blocking; slow work (throttle
    // duty cycles, SIGKILL timeouts) runs on its own threads.
    let mut enforcer =
        crate::enforce::Enforcer::new(&settings.config.enforce_settings(&settings.node));
    // eBPF probes: attempted once before the first snapshot, so readiness
    // means "probes started or said why not"; failures are statuses.
    let mut probes =
        crate::probes::Probes::start(&settings.config.probes, &settings.config.agent.state_dir);
    if let Some(stats) = probes.take_process_stats() {
        resolver.set_proc_source(Box::new(stats));
    }
    if let Some(exited) = probes.take_exited() {
        resolver.set_exited(Box::new(exited));
    }
    let mut samples = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let taken_at_ms = unix_ms();
        let sample = gpus.sample(&mut resolver);
        samples += 1;
        let mut snapshot = Snapshot {
            node: settings.node.clone(),
            taken_at_ms,
            samples,
            nvml: sample.nvml,
            gpus: sample.gpus,
            tenant_gpu: sample.tenant_gpu,
            workload_gpu: sample.workload_gpu,
            tenant_io: Vec::new(),
            probes: probes.statuses(),
            sample_duration_seconds: 0.0,
            ..Default::default()
        };
        snapshot.tenant_io = probes.sample(&resolver, &snapshot.gpus);
        snapshot.unallocated_gpu_use = resolver.unallocated_gpu_use(&snapshot.gpus);
        snapshot.sampled_at = Some(Instant::now());
        snapshot.sample_duration_seconds = started.elapsed().as_secs_f64();
        enforcer.attribute_cgroups(&|cgroup| resolver.tenant_for_cgroup(cgroup));
        let enforcement = enforcer.observe(&snapshot);
        snapshot.tenant_quotas = enforcement.quotas;
        snapshot.enforcement_actions = enforcement.actions;
        snapshot.device_denials = enforcement.device_denials;
        if samples == 1 {
            // Start-up is over (probes attached, cgroups opened, first
            // enforcement pass done): keep only what running needs, before
            // readiness flips with the first snapshot.
            crate::privileges::drop_after_start_up();
            crate::allocator::release_start_up_scratch();
            if let Err(e) = crate::code_pages::release_start_up_code() {
                debug!("start-up code stays resident: {e}");
            }
        }
        let snapshot = Arc::new(snapshot);
        tx.send_replace(snapshot);

        next += settings.sample_interval;
        let now = Instant::now();
        if next < now {
            // Fell behind (a slow driver): restart the schedule from now.
            next = now;
        }
        // Parked, not polled: one wake-up per cycle, and `stopped` unparks
        // it at once (a spurious wake-up just parks again).
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(next - Instant::now());
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn route(
    req: &Request<Incoming>,
    latest: &Latest,
    exported: &Metrics,
    waiting: &Mutex<Option<String>>,
) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        // RFC 9110: a 405 names the methods that are allowed.
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let gzip = req
                .headers()
                .get_all(ACCEPT_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(metrics::accepts_gzip);
            let mut r = respond(StatusCode::OK, metrics::CONTENT_TYPE, exported.body(gzip));
            let headers = r.headers_mut();
            // Caches must not hand a gzipped body to a client that did
            // not ask for one, nor the reverse.
            headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
            if gzip {
                headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let snap = latest.borrow().clone();
            let waiting = waiting.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(reason) = waiting {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!("not ready: {reason}\n"),
                )
            } else if snap.samples > 0 {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no sample yet\n",
                )
            }
        }
        "/api/v1/snapshot" => {
            let snap = latest.borrow().clone();
            match serde_json::to_vec_pretty(&*snap) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    format!("cannot encode JSON: {e}\n"),
                ),
            }
        }
        "/" => text(
            StatusCode::OK,
            "tally agent: /metrics /healthz /readyz /api/v1/snapshot\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
