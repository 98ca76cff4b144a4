//! Time-of-use energy prices: `[prices] energy_kwh` written as a table of
//! prices by local time of day, and which of them an hour is charged at.
//!
//! ```toml
//! [prices]
//! energy_kwh = { default = 0.12, "22:00-06:00" = 0.07 }
//! timezone = "Europe/Paris"      # IANA name; default UTC
//! ```
//!
//! **What a window means.** Windows are `HH:MM-HH:MM` on the local wall
//! clock of `timezone`, start included, end excluded; one whose end is
//! before its start runs past midnight. The ledger keeps usage by the UTC
//! hour its reports end in, so each UTC hour's energy is charged at the
//! price in force, locally, when that hour *begins*. In zones a whole
//! number of hours from UTC a window on whole local hours is therefore
//! exact; in a zone with a :30 or :45 offset (Asia/Kolkata) a window takes
//! effect from the first UTC hour that begins inside it. On DST days the
//! windows follow the local clock: the night window is an hour shorter or
//! longer in real time, as the utility's meter sees it.

use jiff::{Timestamp, tz::TimeZone};
use tally_contract::config::Problems;

/// Minutes in a day.
const DAY_MIN: u16 = 24 * 60;

/// `[prices] energy_kwh` as a table, with the zone its windows are in.
#[derive(Debug, Clone)]
pub(crate) struct TimeOfUse {
    pub(crate) zone: TimeZone,
    /// Disjoint windows, as written.
    pub(crate) windows: Vec<Window>,
}

/// One priced window of the day.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Window {
    /// As written, e.g. `22:00-06:00`.
    pub(crate) name: String,
    /// Minutes after local midnight, `[start, end)`; `end < start` wraps.
    pub(crate) start: u16,
    pub(crate) end: u16,
    pub(crate) price: f64,
}

impl Window {
    fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

impl TimeOfUse {
    /// The price of the window in force at `ms` on the local clock;
    /// `None`: no window, the default price.
    pub(crate) fn price_at(&self, ms: i64) -> Option<f64> {
        let local = self.zone.to_datetime(Timestamp::from_millisecond(ms).ok()?);
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        self.windows
            .iter()
            .find(|w| w.contains(minute))
            .map(|w| w.price)
    }
}

#[cfg(test)]
impl TimeOfUse {
    /// The default price and windows of an inline table such as
    /// `{ default = 0.12, "22:00-06:00" = 0.07 }` in `zone`; panics when
    /// they are bad.
    pub(crate) fn parse(table: &str, zone_name: &str) -> (f64, Self) {
        let table: toml::Table = toml::from_str(&format!("t = {table}")).unwrap();
        let mut problems = Problems {
            file: "test".into(),
            problems: vec![],
        };
        let t = table["t"].as_table().unwrap();
        time_of_use(t, zone(zone_name).unwrap(), &mut problems)
            .unwrap_or_else(|| panic!("{problems}"))
    }
}

/// The zone named `name` in the bundled tz database.
pub(super) fn zone(name: &str) -> Result<TimeZone, String> {
    jiff::tz::db().get(name).map_err(|_| {
        format!(
            "`{name}` is not a time zone of the IANA tz database (e.g. \"Europe/Paris\", \"UTC\")"
        )
    })
}

/// `HH:MM` (or `24:00`, as an end) as minutes after midnight.
fn clock(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

/// Parses `energy_kwh` written as a table: its `default` price and its
/// windows. Every problem is pushed, named by its key.
pub(super) fn time_of_use(
    table: &toml::Table,
    zone: TimeZone,
    problems: &mut Problems,
) -> Option<(f64, TimeOfUse)> {
    let key = |k: &str| match k {
        "default" => "prices.energy_kwh.default".to_owned(),
        _ => format!("prices.energy_kwh.\"{k}\""),
    };
    let price = |k: &str, v: &toml::Value, problems: &mut Problems| {
        let p = match v {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            _ => None,
        };
        match p.filter(|p| p.is_finite() && *p >= 0.0) {
            Some(p) => Some(p),
            None => {
                problems.push(key(k), "must be a price ≥ 0");
                None
            }
        }
    };
    let before = problems.problems.len();
    let mut default = None;
    let mut windows: Vec<Window> = Vec::new();
    // Which window covers each minute of the day, to name overlaps.
    let mut owner: Vec<Option<usize>> = vec![None; DAY_MIN as usize];
    // In key order, whatever order the TOML parser keeps: problems read
    // the same every time.
    let mut entries: Vec<(&String, &toml::Value)> = table.iter().collect();
    entries.sort_by_key(|(k, _)| *k);
    for (k, v) in entries {
        let p = price(k, v, problems);
        if k == "default" {
            default = p;
            continue;
        }
        let bounds = k
            .split_once('-')
            .and_then(|(a, b)| Some((clock(a.trim())?, clock(b.trim())?)));
        let Some((start, end)) = bounds.filter(|(s, _)| *s < DAY_MIN) else {
            problems.push(
                key(k),
                "is not a window: use \"HH:MM-HH:MM\" on the local clock (e.g. \"22:00-06:00\"), \
                 or `default`",
            );
            continue;
        };
        let end = end % DAY_MIN;
        if start == end {
            problems.push(
                key(k),
                "starts where it ends: a window is a part of the day, `default` prices the rest",
            );
            continue;
        }
        let w = Window {
            name: k.clone(),
            start,
            end,
            price: p.unwrap_or(0.0),
        };
        let minutes: Vec<usize> = (0..DAY_MIN)
            .filter(|m| w.contains(*m))
            .map(usize::from)
            .collect();
        if let Some(other) = minutes.iter().find_map(|m| owner[*m]) {
            problems.push(
                key(k),
                format!(
                    "overlaps \"{}\": windows must not overlap",
                    windows[other].name
                ),
            );
            continue;
        }
        for m in minutes {
            owner[m] = Some(windows.len());
        }
        windows.push(w);
    }
    if default.is_none() && !table.contains_key("default") {
        problems.push(
            "prices.energy_kwh.default",
            "is missing: the price outside every window",
        );
    }
    (problems.problems.len() == before)
        .then(|| (default.unwrap_or(0.0), TimeOfUse { zone, windows }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, tz: &str) -> Result<(f64, TimeOfUse), Vec<(String, String)>> {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut problems = Problems {
            file: "a.toml".into(),
            problems: vec![],
        };
        let t = table["energy_kwh"].as_table().unwrap();
        time_of_use(t, zone(tz).unwrap(), &mut problems).ok_or_else(|| {
            problems
                .problems
                .iter()
                .map(|p| (p.key.clone(), p.message.clone()))
                .collect()
        })
    }

    /// Milliseconds of a UTC time.
    fn utc(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn windows_are_read_on_the_local_clock_across_dst() {
        let (default, tou) = parse(
            r#"energy_kwh = { default = 0.12, "22:00-06:00" = 0.07, "12:00-14:00" = 0.2 }"#,
            "Europe/Paris",
        )
        .unwrap();
        assert_eq!(default, 0.12);
        let at = |s: &str| tou.price_at(utc(s));
        // Winter, UTC+1: local 22:00 is 21:00 UTC.
        assert_eq!(at("2026-11-30T20:00:00Z"), None);
        assert_eq!(at("2026-11-30T21:00:00Z"), Some(0.07));
        assert_eq!(at("2026-12-01T04:00:00Z"), Some(0.07));
        assert_eq!(at("2026-12-01T05:00:00Z"), None, "06:00 local: ended");
        assert_eq!(at("2026-12-01T11:00:00Z"), Some(0.2));
        // Summer, UTC+2: the same windows two hours before UTC.
        assert_eq!(at("2026-07-01T20:00:00Z"), Some(0.07));
        assert_eq!(at("2026-07-01T04:00:00Z"), None);
        // 2026-10-25, clocks back at 03:00 CEST: local 02:00 happens twice,
        // both in the window; the night holds 9 real hours.
        let night = (0..24)
            .map(|h| utc("2026-10-24T18:00:00Z") + h * 3_600_000)
            .filter(|ms| tou.price_at(*ms) == Some(0.07))
            .count();
        assert_eq!(night, 9);
        // 2026-03-29, clocks forward: 7 real hours.
        let night = (0..24)
            .map(|h| utc("2026-03-28T18:00:00Z") + h * 3_600_000)
            .filter(|ms| tou.price_at(*ms) == Some(0.07))
            .count();
        assert_eq!(night, 7);
    }

    /// Kolkata is UTC+5:30: UTC hours begin at local :30, so a window on
    /// whole local hours starts with the first UTC hour beginning in it.
    #[test]
    fn half_hour_zones_price_by_the_local_time_an_hour_begins() {
        let (_, tou) = parse(
            r#"energy_kwh = { default = 0.1, "22:00-06:00" = 0.05 }"#,
            "Asia/Kolkata",
        )
        .unwrap();
        // 16:00 UTC = 21:30 local: before the window.
        assert_eq!(tou.price_at(utc("2026-11-30T16:00:00Z")), None);
        // 17:00 UTC = 22:30 local.
        assert_eq!(tou.price_at(utc("2026-11-30T17:00:00Z")), Some(0.05));
        // 00:00 UTC = 05:30 local: still in; 01:00 UTC = 06:30: out.
        assert_eq!(tou.price_at(utc("2026-12-01T00:00:00Z")), Some(0.05));
        assert_eq!(tou.price_at(utc("2026-12-01T01:00:00Z")), None);
    }

    #[test]
    fn bad_tables_are_named_key_by_key() {
        let err = parse(
            r#"energy_kwh = { "22:00-06:00" = 0.07, "05:00-07:00" = 0.1, "25:00-01:00" = 1, "9-17" = 1, "08:00-08:00" = 1, "12:00-13:00" = -1, "14:00-24:00" = "x" }"#,
            "UTC",
        )
        .unwrap_err();
        let keys: Vec<&str> = err.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "prices.energy_kwh.\"08:00-08:00\"",
                "prices.energy_kwh.\"12:00-13:00\"",
                "prices.energy_kwh.\"14:00-24:00\"",
                "prices.energy_kwh.\"22:00-06:00\"",
                "prices.energy_kwh.\"25:00-01:00\"",
                "prices.energy_kwh.\"9-17\"",
                "prices.energy_kwh.default",
            ],
            "{err:?}"
        );
        assert!(err[0].1.contains("starts where it ends"), "{err:?}");
        assert!(err[1].1.contains("≥ 0"), "{err:?}");
        assert!(err[3].1.contains("overlaps \"05:00-07:00\""), "{err:?}");
        assert!(err[4].1.contains("HH:MM-HH:MM"), "{err:?}");
        // Touching windows do not overlap; 24:00 ends at midnight.
        let (_, tou) = parse(
            r#"energy_kwh = { default = 1, "00:00-06:00" = 0.5, "18:00-24:00" = 2, "06:00-07:30" = 3 }"#,
            "UTC",
        )
        .unwrap();
        assert_eq!(tou.windows.len(), 3);
        assert_eq!(tou.price_at(utc("2026-11-30T23:00:00Z")), Some(2.0));
        assert_eq!(tou.price_at(utc("2026-11-30T07:00:00Z")), Some(3.0));
        assert_eq!(tou.price_at(utc("2026-11-30T08:00:00Z")), None);
        assert!(zone("Mars/Olympus").unwrap_err().contains("Mars/Olympus"));
    }
}
