//! When to encode a snapshot before anyone scrapes it. A scraper comes at a
//! steady period (Prometheus: every 15–60 s), while the sampler publishes a
//! snapshot every interval (1 s): encoding every snapshot would cost the
//! period over the interval times the encodes needed, and encoding on the
//! first scrape puts the whole encode (tens of milliseconds at 20,000
//! series) into that scrape's latency. So the agent learns the period from
//! the last few scrapes and encodes a snapshot ahead only when a scrape is
//! expected before the next snapshot or the one after: about two encodes
//! per scrape, none on the request path. A scrape that comes early (a
//! person with curl) still gets the latest snapshot, encoded then.

use std::{collections::VecDeque, time::Duration, time::Instant};

/// Scrapes remembered: enough to see the shortest gap of a pair of
/// Prometheus replicas (HA) scraping at offsets from each other.
const REMEMBERED: usize = 5;

/// Past this without a scrape, the scraper is gone (Prometheus marks a
/// target's series stale after 5 minutes): encode on demand only.
const GONE_AFTER: Duration = Duration::from_secs(300);

/// The last scrapes' times and whether they asked for gzip.
#[derive(Debug, Default)]
pub(super) struct ScrapeClock {
    recent: VecDeque<(Instant, bool)>,
}

impl ScrapeClock {
    /// A scrape came at `now`.
    pub(super) fn scraped(&mut self, now: Instant, gzip: bool) {
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent.push_back((now, gzip));
    }

    /// Whether a snapshot published at `now`, replaced by the next one an
    /// `interval` later, is worth encoding ahead: `Some(gzip)` when a
    /// scrape is expected within two intervals (one of slack for a
    /// scraper's jitter), `gzip` when a recent scrape asked for it.
    pub(super) fn ahead(&self, now: Instant, interval: Duration) -> Option<bool> {
        let &(last, _) = self.recent.back()?;
        let since = now.saturating_duration_since(last);
        if since > GONE_AFTER {
            return None;
        }
        // The shortest recent gap: with two scrapers at offsets the next
        // scrape may be either's. With one scrape only the period is not
        // known yet: encode each snapshot until the second comes.
        let period = self
            .recent
            .iter()
            .zip(self.recent.iter().skip(1))
            .map(|((a, _), (b, _))| b.saturating_duration_since(*a))
            .min();
        let due = period.is_none_or(|p| since + 2 * interval >= p);
        due.then(|| self.recent.iter().any(|(_, gzip)| *gzip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn nobody_scraped_nothing_ahead() {
        assert_eq!(ScrapeClock::default().ahead(Instant::now(), SECOND), None);
    }

    #[test]
    fn a_steady_scraper_gets_the_two_snapshots_before_its_scrape() {
        let t0 = Instant::now();
        let mut clock = ScrapeClock::default();
        clock.scraped(t0, true);
        // The period is not known yet: every snapshot.
        assert_eq!(clock.ahead(t0 + 3 * SECOND, SECOND), Some(true));
        clock.scraped(t0 + 15 * SECOND, true);
        // Snapshots published 1 s apart after the second scrape: only
        // those within two intervals of the third (at 30 s) are encoded.
        let ahead: Vec<u64> = (16..=30)
            .filter(|s| clock.ahead(t0 + Duration::from_secs(*s), SECOND).is_some())
            .collect();
        assert_eq!(ahead, [28, 29, 30]);
        // Late (jitter, a slow scraper): keeps encoding until it comes.
        assert!(clock.ahead(t0 + 40 * SECOND, SECOND).is_some());
    }

    #[test]
    fn a_scraper_faster_than_the_interval_gets_every_snapshot() {
        let t0 = Instant::now();
        let mut clock = ScrapeClock::default();
        for i in 0..5u32 {
            clock.scraped(t0 + i * Duration::from_millis(200), false);
        }
        let now = t0 + Duration::from_millis(900);
        assert_eq!(clock.ahead(now, SECOND), Some(false));
    }

    #[test]
    fn two_scrapers_at_offsets_the_shorter_gap_counts() {
        // Two replicas every 10 s, 3 s apart: gaps 3 s and 7 s.
        let t0 = Instant::now();
        let mut clock = ScrapeClock::default();
        for s in [0, 3, 10, 13] {
            clock.scraped(t0 + Duration::from_secs(s), s == 3);
        }
        // 1 s after the last scrape, the next (at 20 s) is 6 s away, but
        // the shortest gap says it could come at 16 s.
        assert_eq!(clock.ahead(t0 + 14 * SECOND, SECOND), Some(true));
        assert_eq!(clock.ahead(t0 + 13 * SECOND, SECOND), None);
    }

    #[test]
    fn a_scraper_gone_for_five_minutes_gets_nothing_ahead() {
        let t0 = Instant::now();
        let mut clock = ScrapeClock::default();
        clock.scraped(t0, false);
        clock.scraped(t0 + 15 * SECOND, false);
        assert!(clock.ahead(t0 + 60 * SECOND, SECOND).is_some());
        assert_eq!(clock.ahead(t0 + 316 * SECOND, SECOND), None);
    }
}
