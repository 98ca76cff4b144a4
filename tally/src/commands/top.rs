//! `tally top`: a live terminal view of one node (its agent's snapshot) or
//! of the cluster (the aggregator's view), refreshed at the agent's sample
//! interval. Without a terminal it prints one frame as plain text.

mod draw;
mod model;

use std::{
    io::IsTerminal,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use model::{SortKey, View};
use ratatui::{Terminal, backend::TestBackend};
use tally_agent::{report::client_builder, snapshot::Snapshot};
use tally_aggregator::cluster::ClusterView;
use tally_contract::{config::EX_USAGE, token::read_token};

use crate::runtime;

#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// The agent to watch.
    #[arg(long, default_value = "http://127.0.0.1:9477")]
    pub(crate) agent: String,
    /// Watch the cluster through this aggregator instead of one agent.
    #[arg(long, conflicts_with = "agent")]
    pub(crate) aggregator: Option<String>,
    /// File holding a reader token for the aggregator (admin or tenant).
    #[arg(long, requires = "aggregator")]
    pub(crate) token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an `https://` aggregator (a private CA).
    #[arg(long, requires = "aggregator")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Tenant column to sort by at start (keys change it live).
    #[arg(long, value_enum, default_value_t = SortKey::Gpu)]
    pub(crate) sort: SortKey,
    /// Refresh this often [default: the agent's sample interval, or the
    /// shortest report interval in the cluster view].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) interval: Option<Duration>,
}

/// Where the data comes from.
enum Source {
    Agent(String),
    Aggregator { url: String, token: Option<String> },
}

impl Source {
    fn label(&self) -> &str {
        match self {
            Source::Agent(u) | Source::Aggregator { url: u, .. } => u,
        }
    }
}

/// What one refresh learned: the view, and how often new data comes.
struct Poller {
    source: Source,
    client: reqwest::Client,
    prev: Option<Snapshot>,
}

impl Poller {
    async fn poll(&mut self) -> Result<(View, Option<Duration>), String> {
        match &self.source {
            Source::Agent(base) => {
                let url = format!("{}/api/v1/snapshot", base.trim_end_matches('/'));
                let snap: Snapshot = get_json(self.client.get(&url), &url).await?;
                let interval = self.prev.as_ref().and_then(|p| {
                    let n = snap.samples.checked_sub(p.samples).filter(|n| *n > 0)?;
                    let ms = snap.taken_at_ms.checked_sub(p.taken_at_ms)? / n;
                    Some(Duration::from_millis(ms))
                });
                let view = model::from_snapshot(self.prev.as_ref(), &snap);
                if self.prev.as_ref().is_none_or(|p| p.samples != snap.samples) {
                    self.prev = Some(snap);
                }
                Ok((view, interval))
            }
            Source::Aggregator { url: base, token } => {
                let url = format!("{}/api/v1/cluster", base.trim_end_matches('/'));
                let mut req = self.client.get(&url);
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let c: ClusterView = get_json(req, &url).await?;
                let interval = model::interval_ms(&c).map(|ms| Duration::from_millis(ms as u64));
                Ok((model::from_cluster(&c), interval))
            }
        }
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
    url: &str,
) -> Result<T, String> {
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("{url}: {status}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{url}: not the expected JSON: {e}"))
}

/// The live view's state between frames.
struct Screen {
    view: View,
    sort: SortKey,
    reverse: bool,
    interval: Duration,
    error: Option<String>,
}

impl Screen {
    fn draw(&mut self, f: &mut ratatui::Frame<'_>, source: &str) {
        model::sort_tenants(&mut self.view.tenants, self.sort, self.reverse);
        let status = draw::Status {
            source,
            interval: self.interval,
            sort: self.sort,
            reverse: self.reverse,
            error: self.error.as_deref(),
        };
        draw::frame(f, &self.view, &status);
    }

    /// Takes one refresh's result: new data, or an error shown above the
    /// last data.
    fn update(&mut self, result: Result<(View, Option<Duration>), String>, fixed: bool) {
        match result {
            Ok((view, interval)) => {
                self.view = view;
                self.error = None;
                if let Some(i) = interval.filter(|_| !fixed) {
                    // Bounded so a bad clock cannot freeze or spin the view.
                    self.interval = i.clamp(Duration::from_millis(100), Duration::from_secs(10));
                }
            }
            Err(e) => self.error = Some(e),
        }
    }
}

/// `tally top`.
pub(crate) fn run(args: TopArgs) -> ExitCode {
    let source = match &args.aggregator {
        None => Source::Agent(args.agent.clone()),
        Some(url) => {
            let token = match args.token_file.as_deref().map(read_token).transpose() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("--token-file: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            Source::Aggregator {
                url: url.clone(),
                token,
            }
        }
    };
    let client = match client_builder(Duration::from_secs(5), args.ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("--ca-file: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let client = match client.build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tally top: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut poller = Poller {
        source,
        client,
        prev: None,
    };
    let mut screen = Screen {
        view: View::default(),
        sort: args.sort,
        reverse: false,
        interval: args.interval.unwrap_or(Duration::from_secs(1)),
        error: None,
    };
    let fixed = args.interval.is_some();
    let result = runtime::block_on(async {
        if std::io::stdout().is_terminal() {
            live(&mut poller, &mut screen, fixed).await
        } else {
            once(&mut poller, &mut screen).await
        }
    });
    match result {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("tally top: {e}");
            ExitCode::FAILURE
        }
        None => ExitCode::FAILURE,
    }
}

/// Piped: one frame. From an agent, polled until its sample count moves
/// (so rates are known, even with a sample interval above the refresh),
/// for at most [`ONCE_PATIENCE`]; from an aggregator, two polls.
async fn once(poller: &mut Poller, screen: &mut Screen) -> Result<(), String> {
    let first = poller.poll().await?;
    screen.update(Ok(first), false);
    let deadline = Instant::now() + ONCE_PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(screen.interval.min(left)).await;
        let (view, interval) = poller.poll().await?;
        // From an agent, an interval is known once two samples are.
        let rates_known = interval.is_some() || matches!(poller.source, Source::Aggregator { .. });
        screen.update(Ok((view, interval)), false);
        if rates_known || Instant::now() >= deadline {
            break;
        }
    }
    let height = (screen.view.gpus.len() + screen.view.tenants.len() + 10) as u16;
    let mut term = Terminal::new(TestBackend::new(100, height)).map_err(|e| e.to_string())?;
    let source = poller.source.label().to_owned();
    term.draw(|f| screen.draw(f, &source))
        .map_err(|e| e.to_string())?;
    print!("{}", plain(term.backend().buffer()));
    Ok(())
}

/// How long a piped `tally top` waits for an agent's next sample.
const ONCE_PATIENCE: Duration = Duration::from_secs(10);

/// A drawn buffer as lines of text, trailing blanks trimmed.
fn plain(buf: &ratatui::buffer::Buffer) -> String {
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// On a terminal: redraw every interval and on each key until `q`.
async fn live(poller: &mut Poller, screen: &mut Screen, fixed: bool) -> Result<(), String> {
    let mut term = ratatui::try_init().map_err(|e| format!("terminal: {e}"))?;
    let source = poller.source.label().to_owned();
    let result = async {
        loop {
            screen.update(poller.poll().await, fixed);
            term.draw(|f| screen.draw(f, &source))
                .map_err(|e| e.to_string())?;
            let next = Instant::now() + screen.interval;
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                // Key reads block; the runtime lends this worker meanwhile.
                let ev = tokio::task::block_in_place(|| {
                    event::poll(left)?.then(event::read).transpose()
                })
                .map_err(|e| e.to_string())?;
                match ev {
                    Some(Event::Key(k)) if k.kind == KeyEventKind::Press => match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(());
                        }
                        KeyCode::Char('r') => screen.reverse = !screen.reverse,
                        KeyCode::Char(c) => match SortKey::from_key(c) {
                            Some(s) => screen.sort = s,
                            None => continue,
                        },
                        _ => continue,
                    },
                    Some(Event::Resize(..)) => {}
                    Some(_) => continue,
                    None => break,
                }
                term.draw(|f| screen.draw(f, &source))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    .await;
    ratatui::restore();
    result
}
