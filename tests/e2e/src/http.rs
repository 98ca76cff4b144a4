//! The kit's blocking HTTP client (ureq): the calls the e2e tests, the
//! benchmarks and the demo make against the agent and the aggregator.
//!
//! Every status is an answer, not an error: tests assert on 401s and 413s.

use std::{fs, io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use ureq::{
    Agent,
    config::Config,
    http::Uri,
    tls::{Certificate, RootCerts, TlsConfig},
    unversioned::{
        resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver},
        transport::{DefaultConnector, NextTimeout},
    },
};

/// Bodies up to this size are read (a `/metrics` at ~20k series is ~1.4 MiB).
const BODY_LIMIT: u64 = 256 << 20;

/// Requests up to this size (head and body) go out in one write.
const OUTPUT_BUFFER: usize = 4 << 20;

/// An HTTP client: keeps connections alive between calls, optionally
/// speaks TLS to servers signed by a given CA, optionally sends a bearer
/// token.
#[derive(Clone)]
pub struct Client {
    agent: Agent,
    base: String,
    token: Option<String>,
}

/// One answer: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The status line and header lines, `\r\n`-separated, as a client sees
    /// them (names lower-case).
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn config() -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(Duration::from_secs(60)))
        // Whole bodies in one write: a server that refuses an oversized
        // body answers 413 and closes, and a body sent in pieces would
        // meet a broken pipe before the answer is read.
        .output_buffer_size(OUTPUT_BUFFER)
}

/// ureq's resolver, except that an address written as an IP needs no
/// lookup. ureq looks every request's host up again, kept connection or
/// not, and with a timeout set it does so on a thread of its own: the
/// bench's load generator started a thread per report it posted (strace:
/// ~3,000 in 5 s), on the 2 cores it shares with the aggregator it
/// measures.
#[derive(Debug, Default)]
struct IpFirst(DefaultResolver);

impl Resolver for IpFirst {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let ip = uri.authority().and_then(|a| {
            let host = a.host().trim_start_matches('[').trim_end_matches(']');
            let port = a.port_u16().or(match uri.scheme_str()? {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            })?;
            Some(SocketAddr::new(host.parse().ok()?, port))
        });
        match ip {
            Some(addr) => {
                let mut out = self.empty();
                out.push(addr);
                Ok(out)
            }
            None => self.0.resolve(uri, config, timeout),
        }
    }
}

/// An agent of `config` that resolves through [`IpFirst`].
fn agent(config: Config) -> Agent {
    Agent::with_parts(config, DefaultConnector::default(), IpFirst::default())
}

impl Client {
    /// Plain HTTP to `addr`.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            agent: agent(config().build()),
            base: format!("http://{addr}"),
            token: None,
        }
    }

    /// HTTPS to `base` (e.g. `https://localhost:8443`), trusting only the
    /// CA certificate(s) in the PEM file `ca`.
    pub fn with_ca(base: &str, ca: &Path) -> io::Result<Client> {
        let pem = fs::read(ca)?;
        let cert = Certificate::from_pem(&pem).map_err(io::Error::other)?;
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::new(vec![cert])))
            .build();
        Ok(Client {
            agent: agent(config().tls_config(tls).build()),
            base: base.trim_end_matches('/').to_owned(),
            token: None,
        })
    }

    /// The same client, sending `Authorization: Bearer <token>`.
    pub fn bearer(mut self, token: &str) -> Client {
        self.token = Some(token.to_owned());
        self
    }

    /// One request with extra `headers`; a non-empty `body` is sent even
    /// on a GET (the tests send odd requests on purpose).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        all.extend_from_slice(headers);
        let result = match method {
            "GET" | "HEAD" | "DELETE" | "OPTIONS" => {
                let mut req = match method {
                    "GET" => self.agent.get(&url),
                    "HEAD" => self.agent.head(&url),
                    "DELETE" => self.agent.delete(&url),
                    _ => self.agent.options(&url),
                };
                for (k, v) in &all {
                    req = req.header(*k, *v);
                }
                if body.is_empty() {
                    req.call()
                } else {
                    req.force_send_body().send(body)
                }
            }
            _ => {
                let mut req = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    "PATCH" => self.agent.patch(&url),
                    other => {
                        return Err(io::Error::other(format!("unsupported method {other}")));
                    }
                };
                for (k, v) in &all {
                    req = req.header(*k, *v);
                }
                req.send(body)
            }
        };
        let mut response = result.map_err(into_io)?;
        let status = response.status().as_u16();
        let mut head = format!("HTTP/1.1 {}", response.status());
        for (name, value) in response.headers() {
            head.push_str(&format!("\r\n{name}: {}", value.to_str().unwrap_or("?")));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_vec()
            .map_err(into_io)?;
        Ok(Response { status, head, body })
    }

    /// GET `path`.
    pub fn get(&self, path: &str) -> io::Result<Response> {
        self.request("GET", path, &[], b"")
    }

    /// POST a JSON body to `path`.
    pub fn post_json(&self, path: &str, body: &[u8]) -> io::Result<Response> {
        self.request("POST", path, &[("Content-Type", "application/json")], body)
    }

    /// GET `path`, expecting 200 and JSON.
    pub fn get_json(&self, path: &str) -> io::Result<serde_json::Value> {
        let r = self.get(path)?;
        if r.status != 200 {
            return Err(io::Error::other(format!(
                "GET {path} answered {}: {}",
                r.status,
                r.text()
            )));
        }
        serde_json::from_slice(&r.body).map_err(io::Error::other)
    }
}

fn into_io(e: ureq::Error) -> io::Error {
    match e {
        ureq::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// A GET request; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], b"")
}

/// One request on a fresh client; returns status and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<(u16, String)> {
    http_exchange(addr, method, path, headers, body).map(|(status, _, body)| (status, body))
}

/// [`http_request`], with the status and header lines too.
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<(u16, String, String)> {
    let r = Client::new(addr).request(method, path, headers, body)?;
    Ok((r.status, r.head.clone(), r.text()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ureq::unversioned::transport::time;

    use super::*;

    fn resolve(uri: &str, timeout: Duration) -> Result<Vec<SocketAddr>, ureq::Error> {
        let timeout = NextTimeout {
            after: time::Duration::from(timeout),
            ..NextTimeout::default()
        };
        let config = Agent::config_builder().build();
        let uri: Uri = uri.parse().unwrap();
        Ok(IpFirst::default()
            .resolve(&uri, &config, timeout)?
            .iter()
            .copied()
            .collect())
    }

    /// An IP is its own address, with no lookup to time out; a name is
    /// still looked up.
    #[test]
    fn an_ip_needs_no_lookup_and_a_name_still_gets_one() {
        let none = Duration::ZERO;
        assert_eq!(
            resolve("http://127.0.0.1:9445/x", none).unwrap(),
            ["127.0.0.1:9445".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("https://[::1]:8443/", none).unwrap(),
            ["[::1]:8443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("http://10.1.2.3/", none).unwrap(),
            ["10.1.2.3:80".parse::<SocketAddr>().unwrap()]
        );
        let named = resolve("http://localhost:9445/", Duration::from_secs(10)).unwrap();
        assert!(
            named
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 9445)
        );
        assert!(!named.is_empty());
    }
}
