//! The `/metrics` body, made once per snapshot: the snapshot's families
//! are encoded when a snapshot is published (and gzipped once when
//! scrapers ask for gzip), and every scrape until the next one sends those
//! bytes. Only the components' own families (the report sender's counters,
//! a few lines) are encoded per scrape; when they changed, the body is
//! joined again from the cached snapshot text.

use std::{
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use flate2::{Compression, write::GzEncoder};
use hyper::body::Bytes;

use crate::snapshot::Snapshot;

/// One rendering of the body.
#[derive(Debug)]
struct Rendered {
    /// The snapshot it was made from (compared by pointer).
    snapshot: Arc<Snapshot>,
    /// The snapshot's families, as encoded.
    snapshot_text: Arc<str>,
    /// The components' families it was joined with.
    components: String,
    body: Bytes,
    /// `body` gzipped, made on the first request for it.
    gzip: Option<Bytes>,
}

/// The cached body and what scrapers asked for lately.
#[derive(Debug, Default)]
pub(super) struct BodyCache {
    rendered: Mutex<Option<Rendered>>,
    /// Whether a scrape came since the last publish: nobody scraping, no
    /// rendering on the sampling thread.
    scraped: AtomicBool,
    /// Whether the last scrape accepted gzip: then the sampler gzips too.
    gzip_wanted: AtomicBool,
}

impl BodyCache {
    /// A new snapshot is about to be published: renders it now (off the
    /// request path) if anyone scrapes.
    pub(super) fn published(
        &self,
        snapshot: &Arc<Snapshot>,
        encode_snapshot: impl FnOnce(&Arc<Snapshot>) -> String,
        components: impl FnOnce() -> String,
    ) {
        if !self.scraped.swap(false, Ordering::Relaxed) {
            return;
        }
        let gzip = self.gzip_wanted.load(Ordering::Relaxed);
        let rendered = render(
            snapshot.clone(),
            encode_snapshot(snapshot).into(),
            components(),
            gzip,
        );
        *self.lock() = Some(rendered);
    }

    /// The body for a scrape of `latest`: `gzip` when the scraper accepts
    /// it. Returns the bytes and whether they are gzipped.
    pub(super) fn body(
        &self,
        latest: &Arc<Snapshot>,
        gzip: bool,
        encode_snapshot: impl FnOnce(&Arc<Snapshot>) -> String,
        components: String,
    ) -> Bytes {
        self.scraped.store(true, Ordering::Relaxed);
        self.gzip_wanted.store(gzip, Ordering::Relaxed);
        let mut slot = self.lock();
        // The sampler renders a snapshot just before publishing it: a
        // newer rendering than `latest` is the one about to be published.
        let current = slot.as_ref().is_some_and(|r| {
            Arc::ptr_eq(&r.snapshot, latest) || r.snapshot.samples > latest.samples
        });
        if !current {
            // Not rendered yet (the first scrape, or nobody scraped when it
            // was published): once, here.
            *slot = Some(render(
                latest.clone(),
                encode_snapshot(latest).into(),
                components,
                gzip,
            ));
        } else if slot.as_ref().is_some_and(|r| r.components != components) {
            let old = slot.take().expect("checked above");
            *slot = Some(render(old.snapshot, old.snapshot_text, components, gzip));
        }
        let r = slot.as_mut().expect("rendered above");
        if !gzip {
            return r.body.clone();
        }
        r.gzip.get_or_insert_with(|| gzip_bytes(&r.body)).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Rendered>> {
        self.rendered.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The snapshot's families first, then the components' (sub-registries
/// come after collectors in prometheus-client's own order), then `# EOF`.
fn render(
    snapshot: Arc<Snapshot>,
    snapshot_text: Arc<str>,
    components: String,
    gzip: bool,
) -> Rendered {
    let mut body = Vec::with_capacity(snapshot_text.len() + components.len() + 8);
    body.extend_from_slice(snapshot_text.as_bytes());
    body.extend_from_slice(components.as_bytes());
    body.extend_from_slice(b"# EOF\n");
    let body = Bytes::from(body);
    let gzip = gzip.then(|| gzip_bytes(&body));
    Rendered {
        snapshot,
        snapshot_text,
        components,
        body,
        gzip,
    }
}

/// gzip at the fast level: the text is repetitive (label sets), so level 1
/// already shrinks it several-fold, at a fraction of the default's CPU.
fn gzip_bytes(body: &[u8]) -> Bytes {
    let mut gz = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(body);
    Bytes::from(gz.finish().unwrap_or_default())
}

/// Whether an `Accept-Encoding` header value accepts gzip (RFC 9110
/// 12.5.3): `gzip` (or `x-gzip`, or `*` when gzip is not named) with a
/// q-value above 0.
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    let mut star = None;
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim().eq_ignore_ascii_case("q").then(|| v.trim())
            })
            .next()
            .map_or(Some(1.0), |v| v.parse::<f64>().ok());
        // A malformed q-value is not an acceptance.
        let accepted = q.is_some_and(|q| q > 0.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            return accepted;
        }
        if coding == "*" {
            star = Some(accepted);
        }
    }
    star.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn gzip_negotiation_follows_the_q_values() {
        for (header, gzip) in [
            ("gzip", true),
            ("gzip, deflate, br", true),
            ("deflate, gzip;q=0.5", true),
            ("GZIP", true),
            ("x-gzip", true),
            ("*", true),
            ("br;q=1.0, *;q=0.1", true),
            ("", false),
            ("identity", false),
            ("deflate, br", false),
            ("gzip;q=0", false),
            ("gzip; q=0.000", false),
            ("gzip;q=0, *", false),
            ("*;q=0", false),
            ("gzip;q=oops", false),
        ] {
            assert_eq!(accepts_gzip(header), gzip, "Accept-Encoding: {header:?}");
        }
    }

    fn gunzip(bytes: &[u8]) -> String {
        let mut out = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn a_snapshot_is_encoded_once_and_gzipped_once() {
        let cache = BodyCache::default();
        let snap = Arc::new(Snapshot::default());
        let encodes = std::cell::Cell::new(0);
        let encode = |_: &Arc<Snapshot>| {
            encodes.set(encodes.get() + 1);
            "# TYPE x gauge\nx 1\n".to_owned()
        };
        let plain = cache.body(&snap, false, encode, String::new());
        assert_eq!(&plain[..], b"# TYPE x gauge\nx 1\n# EOF\n");
        let gz = cache.body(&snap, true, encode, String::new());
        assert_eq!(gunzip(&gz), "# TYPE x gauge\nx 1\n# EOF\n");
        assert_eq!(cache.body(&snap, true, encode, String::new()), gz);
        assert_eq!(encodes.get(), 1);

        // Components changed: joined again, the snapshot not re-encoded.
        let body = cache.body(&snap, false, encode, "y_total 2\n".to_owned());
        assert_eq!(&body[..], b"# TYPE x gauge\nx 1\ny_total 2\n# EOF\n");
        assert_eq!(encodes.get(), 1);

        // A new snapshot, published after scrapes asked for gzip: rendered
        // and gzipped by the publisher, then served as is.
        let next = Arc::new(Snapshot {
            samples: 2,
            ..Default::default()
        });
        cache.published(&next, encode, || "y_total 2\n".to_owned());
        assert_eq!(encodes.get(), 2);
        // Rendered before it is published: a scrape still seeing the older
        // snapshot gets the newer body rather than encoding the older one.
        let _ = cache.body(&snap, false, encode, "y_total 2\n".to_owned());
        assert_eq!(encodes.get(), 2);
        let gz = cache.body(&next, true, encode, "y_total 2\n".to_owned());
        assert_eq!(gunzip(&gz), "# TYPE x gauge\nx 1\ny_total 2\n# EOF\n");
        assert_eq!(encodes.get(), 2);

        // Nobody scraped since: the next publish renders nothing.
        let _ = cache.scraped.swap(false, Ordering::Relaxed);
        cache.published(&Arc::new(Snapshot::default()), encode, String::new);
        assert_eq!(encodes.get(), 2);
    }
}
