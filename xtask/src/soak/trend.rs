//! Whether a series sampled during the soak (RSS, descriptors, map
//! entries) is flat: a least-squares line through the samples after
//! warm-up, and a limit that only a real leak crosses.

/// The least-squares line through a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Fit {
    /// Growth per hour.
    pub per_hour: f64,
    /// Growth the line shows over the samples' time span (per_hour × span):
    /// what a short run can actually see.
    pub rise: f64,
    /// Mean of the samples.
    pub mean: f64,
    pub samples: usize,
}

/// Fits `value = a + b·t` to `(t seconds, value)` points; `None` with
/// fewer than three points or no time between them.
pub(super) fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len();
    if n < 3 {
        return None;
    }
    let nf = n as f64;
    let mt = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let mv = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let sxx: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - mv)).sum();
    let per_second = sxy / sxx;
    let span = points[n - 1].0 - points[0].0;
    Some(Fit {
        per_hour: per_second * 3600.0,
        rise: per_second * span,
        mean: mv,
        samples: n,
    })
}

/// What counts as a leak: growth faster than `per_hour` that also rose by
/// more than `floor` over the run. The floor keeps a short run's noise
/// (an allocator arena, a scrape's socket) from extrapolating to a big
/// hourly slope; over an hour, the slope limit is the one that bites.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Limit {
    pub per_hour: f64,
    pub floor: f64,
}

impl Limit {
    pub(super) fn leaks(&self, f: &Fit) -> bool {
        f.per_hour > self.per_hour && f.rise > self.floor
    }
}

/// The points from `warm_up` seconds on.
pub(super) fn after(points: &[(f64, f64)], warm_up: f64) -> Vec<(f64, f64)> {
    points.iter().copied().filter(|p| p.0 >= warm_up).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS: Limit = Limit {
        per_hour: 4.0,
        floor: 2.0,
    };

    /// One sample every 10 s for `minutes`, `f(t)` at each.
    fn series(minutes: f64, f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..=(minutes * 6.0) as usize)
            .map(|i| {
                let t = i as f64 * 10.0;
                (t, f(t))
            })
            .collect()
    }

    #[test]
    fn the_line_is_the_least_squares_one() {
        let f = fit(&[(0.0, 1.0), (1800.0, 2.0), (3600.0, 3.0)]).unwrap();
        assert!((f.per_hour - 2.0).abs() < 1e-9, "{f:?}");
        assert!((f.rise - 2.0).abs() < 1e-9);
        assert!((f.mean - 2.0).abs() < 1e-9);
        assert_eq!(fit(&[(0.0, 1.0), (1.0, 2.0)]), None, "two points");
        assert_eq!(fit(&[(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)]), None, "no time");
    }

    #[test]
    fn a_flat_noisy_hour_passes_and_a_slow_leak_fails() {
        // ±1.5 MiB of jitter around 40 MiB: flat.
        let flat = series(60.0, |t| 40.0 + 1.5 * (t / 70.0).sin());
        let f = fit(&flat).unwrap();
        assert!(!RSS.leaks(&f), "{f:?}");
        // 100 bytes per churned process at 50/s: 17 MiB an hour.
        let leak = series(60.0, |t| {
            40.0 + 1.5 * (t / 70.0).sin() + t * 50.0 * 100.0 / 1048576.0
        });
        let f = fit(&leak).unwrap();
        assert!(RSS.leaks(&f), "{f:?}");
        assert!((f.per_hour - 17.2).abs() < 0.5, "{f:?}");
    }

    #[test]
    fn a_short_run_fails_only_on_growth_it_can_see() {
        // One MiB of drift over 3 minutes is 20 MiB/h extrapolated, but
        // within the floor: not evidence of a leak.
        let drift = series(3.0, |t| 40.0 + t / 180.0);
        let f = fit(&drift).unwrap();
        assert!(f.per_hour > RSS.per_hour);
        assert!(!RSS.leaks(&f), "{f:?}");
        // A leak of 1 KiB per process rises 9 MiB in 3 minutes.
        let leak = series(3.0, |t| 40.0 + t * 50.0 / 1024.0);
        assert!(RSS.leaks(&fit(&leak).unwrap()));
    }

    #[test]
    fn warm_up_is_left_out() {
        // Caches filling in the first 10 minutes, flat after.
        let s = series(60.0, |t| 20.0 + 20.0 * (t / 600.0).min(1.0));
        assert!(RSS.leaks(&fit(&s).unwrap()), "whole run");
        assert!(
            !RSS.leaks(&fit(&after(&s, 600.0)).unwrap()),
            "after warm-up"
        );
    }
}
