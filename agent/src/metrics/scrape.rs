//! The `/metrics` body, made once per snapshot: encoded ahead of its scrape
//! when one is expected (`ahead`), else by the first scrape of the
//! snapshot (outside the lock, so other scrapes are served meanwhile);
//! later scrapes send those bytes, and the gzip is made once, ahead or by
//! the first scrape that asks for it. Only the components' own families
//! (the report sender's counters, a few lines) are encoded per scrape; when
//! they changed, the body is joined again from the cached snapshot text. A
//! snapshot nobody is expected to scrape is never encoded.

use std::{
    io::Write as _,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use flate2::{Compression, write::GzEncoder};
use hyper::body::Bytes;

use crate::snapshot::Snapshot;

/// One rendering of the body.
#[derive(Debug)]
struct Rendered {
    /// The snapshot it was made from, compared by pointer (the `Weak`
    /// keeps its address from being reused). Not kept alive by the cache:
    /// once the sampler publishes the next one, the old snapshot's rows
    /// and process lists go (MiBs at 8,192 processes).
    snapshot: Weak<Snapshot>,
    /// Its cycle number.
    samples: u64,
    /// The components' families it was joined with.
    components: String,
    /// The snapshot's families, then the components', then `# EOF`.
    body: Bytes,
    /// Where the snapshot's families end in `body`: their text is a
    /// slice of it, not a second copy (several MiB at 8,192 processes).
    text_len: usize,
    /// `body` gzipped, made on the first request for it.
    gzip: OnceLock<Bytes>,
}

/// The latest rendering.
#[derive(Debug, Default)]
pub(super) struct BodyCache {
    /// Held only to clone or swap the `Arc`: encoding and gzipping happen
    /// outside it.
    rendered: Mutex<Option<Arc<Rendered>>>,
}

impl BodyCache {
    /// The encoded families to serve for a scrape of `latest`, and the
    /// snapshot they are of: `None` when `latest` was not encoded yet (the
    /// caller encodes it, outside the lock). A rendering of a newer
    /// snapshot than `latest` is served too: a concurrent scrape saw the
    /// newer one published first.
    ///
    /// A rendering of an older snapshot is dropped here, before the caller
    /// encodes `latest`: no scrape can be served from it any more, and
    /// keeping it through the encoding would hold two bodies at once (the
    /// agent's peak RSS: 2.9 MiB each at 8,192 processes).
    pub(super) fn text(&self, latest: &Arc<Snapshot>) -> Option<(Arc<Snapshot>, Bytes)> {
        let mut slot = self.lock();
        let r = slot.as_ref()?;
        let current = r.snapshot.upgrade();
        if let Some(s) = current.filter(|s| Arc::ptr_eq(s, latest) || r.samples > latest.samples) {
            return Some((s, r.body.slice(..r.text_len)));
        }
        let stale = slot.take();
        // Freed outside the lock.
        drop(slot);
        drop(stale);
        None
    }

    /// The body of `snapshot`, whose families are `snapshot_text`, joined
    /// with `components`; gzipped when `gzip`.
    pub(super) fn body(
        &self,
        snapshot: Arc<Snapshot>,
        snapshot_text: Bytes,
        components: String,
        gzip: bool,
    ) -> Bytes {
        let cached = self.lock().clone().filter(|r| {
            r.snapshot.as_ptr() == Arc::as_ptr(&snapshot) && r.components == components
        });
        let r = match cached {
            Some(r) => r,
            None => {
                let r = Arc::new(join(snapshot, snapshot_text, components));
                let mut slot = self.lock();
                // Two scrapes can race here: keep the newer snapshot's.
                if slot.as_ref().is_none_or(|o| o.samples <= r.samples) {
                    *slot = Some(r.clone());
                }
                r
            }
        };
        if gzip {
            r.gzip.get_or_init(|| gzip_bytes(&r.body)).clone()
        } else {
            r.body.clone()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Rendered>>> {
        self.rendered.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The snapshot's families first, then the components' (sub-registries
/// come after collectors in prometheus-client's own order), then `# EOF`.
/// A freshly encoded text is extended in place, so there is never a second
/// copy of it, not even while the body is made (2.9 MiB at 8,192
/// processes); a text cut from an earlier body is copied.
fn join(snapshot: Arc<Snapshot>, snapshot_text: Bytes, components: String) -> Rendered {
    let text_len = snapshot_text.len();
    let mut body: Vec<u8> = match snapshot_text.try_into_mut() {
        Ok(unique) => unique.into(),
        Err(shared) => {
            let mut body = Vec::with_capacity(shared.len() + components.len() + 8);
            body.extend_from_slice(&shared);
            body
        }
    };
    body.extend_from_slice(components.as_bytes());
    body.extend_from_slice(b"# EOF\n");
    // The encoder's spare capacity goes back to the allocator.
    body.shrink_to_fit();
    Rendered {
        snapshot: Arc::downgrade(&snapshot),
        samples: snapshot.samples,
        components,
        body: Bytes::from(body),
        text_len,
        gzip: OnceLock::new(),
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

    /// A cache holding `text` as the body of a first snapshot.
    fn cached(text: Bytes) -> (BodyCache, Arc<Snapshot>) {
        let cache = BodyCache::default();
        let snap = Arc::new(Snapshot::default());
        let _ = cache.body(snap.clone(), text, String::new(), false);
        (cache, snap)
    }

    /// The cache holds the body, not the snapshot: once the sampler's
    /// channel lets a snapshot go, its rows go, and a scrape of the next
    /// one encodes that, the old body freed first.
    #[test]
    fn the_cache_does_not_keep_a_snapshot_alive() {
        let (cache, snap) = cached(Bytes::from(b"x 1\n".to_vec()));
        assert_eq!(Arc::strong_count(&snap), 1);
        // A scrape's share of the body; the other owner is the cache.
        let (_, old_body) = cache.text(&snap).unwrap();
        drop(snap);
        let next = Arc::new(Snapshot {
            samples: 2,
            ..Default::default()
        });
        assert!(cache.text(&next).is_none());
        let unique = old_body.try_into_mut();
        assert!(
            unique.is_ok(),
            "the cache still holds the old body while the next is encoded"
        );
    }

    /// A snapshot still alive but older than the latest (a slow scrape
    /// holds it) is not served, and its body is let go too.
    #[test]
    fn an_older_snapshots_body_is_let_go() {
        let (cache, old) = cached(Bytes::from_static(b"x 1\n"));
        let next = Arc::new(Snapshot {
            samples: 2,
            ..Default::default()
        });
        assert!(cache.text(&next).is_none());
        assert!(cache.lock().is_none());
        assert!(cache.text(&old).is_none());
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
        // As `Metrics::body` drives the cache.
        let scrape = |latest: &Arc<Snapshot>, gzip: bool, components: String| {
            let (snapshot, text) = cache
                .text(latest)
                .unwrap_or_else(|| (latest.clone(), encode(latest).into()));
            cache.body(snapshot, text, components, gzip)
        };
        let plain = scrape(&snap, false, String::new());
        assert_eq!(&plain[..], b"# TYPE x gauge\nx 1\n# EOF\n");
        let gz = scrape(&snap, true, String::new());
        assert_eq!(gunzip(&gz), "# TYPE x gauge\nx 1\n# EOF\n");
        assert_eq!(scrape(&snap, true, String::new()), gz);
        assert_eq!(encodes.get(), 1);

        // Components changed: joined again, the snapshot not re-encoded.
        let body = scrape(&snap, false, "y_total 2\n".to_owned());
        assert_eq!(&body[..], b"# TYPE x gauge\nx 1\ny_total 2\n# EOF\n");
        assert_eq!(encodes.get(), 1);
        // And again: the text is cut from that body, without its components.
        let body = scrape(&snap, false, "z 3\n".to_owned());
        assert_eq!(&body[..], b"# TYPE x gauge\nx 1\nz 3\n# EOF\n");
        let body = scrape(&snap, false, "y_total 2\n".to_owned());
        assert_eq!(&body[..], b"# TYPE x gauge\nx 1\ny_total 2\n# EOF\n");
        assert_eq!(encodes.get(), 1);

        // A new snapshot: encoded by its first scrape.
        let next = Arc::new(Snapshot {
            samples: 2,
            ..Default::default()
        });
        let _ = scrape(&next, false, "y_total 2\n".to_owned());
        assert_eq!(encodes.get(), 2);
        // A scrape still seeing the older snapshot gets the newer body
        // rather than encoding the older one.
        let _ = scrape(&snap, false, "y_total 2\n".to_owned());
        assert_eq!(encodes.get(), 2);
        let gz = scrape(&next, true, "y_total 2\n".to_owned());
        assert_eq!(gunzip(&gz), "# TYPE x gauge\nx 1\ny_total 2\n# EOF\n");
        assert_eq!(encodes.get(), 2);

        // Nobody scrapes the next one: it is never encoded.
        let _unscraped = Arc::new(Snapshot::default());
        assert_eq!(encodes.get(), 2);
    }
}
