//! Time-of-use energy prices end to end: a real `tally aggregator` on
//! SQLite with `[prices] energy_kwh = { default = …, "22:00-06:00" = … }`
//! in Europe/Paris, and reports whose intervals end on either side of
//! 22:00 Paris time. Each hour's energy is charged at that hour's price,
//! to the cent, in every grouping, in JSON, CSV and FOCUS, for periods of
//! whole hours (rollups) and with partial hours at the edges (raw rows);
//! a day budget spends each hour's energy at its price too.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{collections::BTreeMap, fs, time::Duration};

use tally_contract::wire::{GpuUsage, Report, SCHEMA_VERSION};
use tally_e2e::{
    aggregator_support::{ADMIN_TOKEN, AGENT_TOKEN, Aggregator, sqlite},
    now_ms, wait_for,
};

/// 2023-11-14T20:00:00Z: 21:00 in Paris (UTC+1 in November).
const T20_MS: u64 = 1_699_992_000_000;
const MIN_MS: u64 = 60_000;
const MJ_PER_KWH: f64 = 3.6e9;
/// The prices the test switches to: the night is cheaper.
const DAY_PRICE: f64 = 1000.0;
const NIGHT_PRICE: f64 = 400.0;

/// (interval end in minutes after 20:00Z, workload, kWh): two reports in
/// the hour before 22:00 Paris, three after.
const USAGE: [(u64, &str, f64); 5] = [
    (20, "prep", 0.25),
    (40, "train", 0.5),
    (80, "train", 1.0),
    (100, "prep", 0.125),
    (130, "train", 2.0),
];

/// A report of `kwh` of acme's energy (and no GPU time) over the half
/// hour ending at `end` (the aggregator refuses more than 10 kW).
fn energy_report(seq: u64, end: u64, kwh: f64) -> Report {
    Report {
        version: SCHEMA_VERSION,
        node: "n1".into(),
        boot_id: "boot-1".into(),
        seq,
        interval_start_ms: end - 30 * MIN_MS,
        interval_end_ms: end,
        gpu_usage: vec![GpuUsage {
            tenant: "acme".into(),
            gpu: "0".into(),
            uuid: "GPU-n1-0".into(),
            model: "Tesla T4".into(),
            mig_profile: None,
            slice_fraction: 1.0,
            allocated_us: 0,
            sm_us: None,
            memory_byte_seconds: 0,
            energy_mj: (kwh * MJ_PER_KWH) as u64,
            workload: None,
            idle_us: 0,
        }],
        io_usage: vec![],
        gpus: vec![],
        audit: vec![],
        report_interval_ms: Some(30 * MIN_MS),
        tenant_quotas: vec![],
        cluster: None,
    }
}

/// Switches a stopped aggregator's energy price to `table` in `zone`.
fn price_by_time_of_day(agg: &mut Aggregator, table: &str, zone: &str) {
    agg.stop();
    let config = fs::read_to_string(&agg.config).unwrap();
    assert!(config.contains("energy_kwh = 1000.0"), "{config}");
    let config = config.replace(
        "energy_kwh = 1000.0",
        &format!("energy_kwh = {table}\ntimezone = \"{zone}\""),
    );
    fs::write(&agg.config, config).unwrap();
    agg.restart();
}

fn reports() -> Vec<Report> {
    let mut start = T20_MS;
    USAGE
        .iter()
        .zip(1u64..)
        .map(|((end_min, workload, kwh), seq)| {
            let end = T20_MS + end_min * MIN_MS;
            let mut r = energy_report(seq, end, *kwh);
            r.interval_start_ms = start;
            r.report_interval_ms = Some(end - start);
            r.gpu_usage[0].allocated_us = (end - start) * 1000;
            r.gpu_usage[0].workload = Some((*workload).into());
            start = end;
            r
        })
        .collect()
}

/// Cents of a decimal amount.
fn cents(s: &str) -> i64 {
    (s.parse::<f64>().unwrap() * 100.0).round() as i64
}

/// The energy items of a chargeback: (workload or "", unit price) → cents.
fn energy_items(json: &serde_json::Value) -> BTreeMap<(String, u64), i64> {
    let mut out = BTreeMap::new();
    for l in json["lines"].as_array().unwrap() {
        let workload = l["workload"].as_str().unwrap_or("").to_owned();
        for i in l["items"].as_array().unwrap() {
            if i["sku"] == "energy-kwh" {
                let price = i["unit_price"].as_f64().unwrap() as u64;
                *out.entry((workload.clone(), price)).or_default() +=
                    i["cost_minor"].as_i64().unwrap();
            }
        }
    }
    out
}

/// The expected energy cents of reports ending in `[from_min, to_min)`
/// after 20:00Z, per workload (or all, `""`) and price: 22:00 Paris is
/// 21:00Z, so the reports ending in the first hour are at the day price.
fn expected(from_min: u64, to_min: u64, by_workload: bool) -> BTreeMap<(String, u64), i64> {
    let mut kwh: BTreeMap<(String, u64), f64> = BTreeMap::new();
    for (end, workload, k) in USAGE {
        if (from_min..to_min).contains(&end) {
            let price = if end < 60 { DAY_PRICE } else { NIGHT_PRICE };
            let w = if by_workload { workload } else { "" };
            *kwh.entry((w.to_owned(), price as u64)).or_default() += k;
        }
    }
    kwh.into_iter()
        .map(|(k, v)| {
            let price = k.1 as f64;
            (k, (v * price * 100.0).round() as i64)
        })
        .collect()
}

#[test]
fn energy_across_a_price_boundary_is_priced_hour_by_hour() {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    for r in reports() {
        let (status, body) = agg.post(&serde_json::to_vec(&r).unwrap(), Some(AGENT_TOKEN));
        assert_eq!(status, 200, "report {}: {body}", r.seq);
    }
    let query = |from_min: u64, to_min: u64, group_by: &str| {
        format!(
            "from={}&to={}&group_by={group_by}",
            (T20_MS + from_min * MIN_MS) / 1000,
            (T20_MS + to_min * MIN_MS) / 1000
        )
    };
    // One price: all 3.875 kWh at it.
    let flat = agg.chargeback(&query(0, 180, "tenant"));
    assert_eq!(flat["lines"][0]["energy_cost"], "3875.00", "{flat}");

    // The same ledger, priced by time of day.
    price_by_time_of_day(
        &mut agg,
        &format!("{{ default = {DAY_PRICE:.1}, \"22:00-06:00\" = {NIGHT_PRICE:.1} }}"),
        "Europe/Paris",
    );

    // Whole hours (20:00Z–23:00Z), and partial hours at both edges
    // (20:30Z–22:30Z: 20:40 at the day price, 22:10 at night's, from raw
    // rows).
    for (from, to) in [(0, 180), (30, 150)] {
        for group_by in [
            "tenant",
            "tenant,node",
            "tenant,gpu_model",
            "tenant,workload",
        ] {
            let what = format!("{group_by} in [+{from}m, +{to}m)");
            let json = agg.chargeback(&query(from, to, group_by));
            let by_workload = group_by == "tenant,workload";
            let want = expected(from, to, by_workload);
            assert_eq!(energy_items(&json), want, "{what}: {json}");
            let energy: i64 = want.values().sum();
            let lines = json["lines"].as_array().unwrap();
            let line_cents: i64 = lines
                .iter()
                .map(|l| cents(l["energy_cost"].as_str().unwrap()))
                .sum();
            assert_eq!(line_cents, energy, "{what}: energy_cost of the lines");
        }
    }
    // 0.75 kWh at the day price, 3.125 at night's.
    let json = agg.chargeback(&query(0, 180, "tenant"));
    assert_eq!(json["lines"][0]["energy_cost"], "2000.00", "{json}");

    // CSV and FOCUS say the same; FOCUS tells the two prices apart.
    let get = |format: &str| {
        let (status, body) = agg.get(
            &format!(
                "/api/v1/chargeback?{}&format={format}",
                query(0, 180, "tenant")
            ),
            Some(ADMIN_TOKEN),
        );
        assert_eq!(status, 200, "format={format}: {body}");
        body
    };
    let csv = get("csv");
    assert!(csv.contains(",2000.00,"), "{csv}");
    let focus = get("focus");
    let mut r = csv::Reader::from_reader(focus.as_bytes());
    let header = r.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (price_id, billed) = (col("SkuPriceId"), col("BilledCost"));
    let mut energy_rows: Vec<(String, String)> = r
        .records()
        .map(|rec| rec.unwrap())
        .filter(|rec| rec[col("SkuId")] == *"energy-kwh")
        .map(|rec| (rec[price_id].to_owned(), rec[billed].to_owned()))
        .collect();
    energy_rows.sort();
    assert_eq!(
        energy_rows,
        [
            ("energy-kwh@1000".to_owned(), "750.00".to_owned()),
            ("energy-kwh@400".to_owned(), "1250.00".to_owned())
        ],
        "{focus}"
    );

    // The exported price is one of the two, whichever is in force now.
    let now = agg
        .metrics()
        .value("tally_price_energy_kwh", &[("currency", "USD")])
        .expect("tally_price_energy_kwh");
    assert!(now == DAY_PRICE || now == NIGHT_PRICE, "{now}");
}

/// A day budget prices energy as chargeback does: 1 kWh in the current
/// UTC hour, which a window covers (400), and 1 kWh in the hour before,
/// at the default price (1000), unless that hour was yesterday.
#[test]
fn budgets_spend_each_hours_energy_at_its_price() {
    let dir = tempfile::tempdir().unwrap();
    let budget = "[[budget]]\ntenant = \"acme\"\nperiod = \"day\"\namount = 10000.0\n";
    let mut agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), budget);
    let end = now_ms() - 1_000;
    let hour = end / 3_600_000 % 24;
    price_by_time_of_day(
        &mut agg,
        &format!(
            "{{ default = {DAY_PRICE:.1}, \"{hour:02}:00-{:02}:00\" = {NIGHT_PRICE:.1} }}",
            (hour + 1) % 24
        ),
        "UTC",
    );
    let mut reports = vec![];
    if hour > 0 {
        reports.push(energy_report(1, end - 3_600_000, 1.0));
    }
    reports.push(energy_report(2, end, 1.0));
    let want = NIGHT_PRICE + if hour > 0 { DAY_PRICE } else { 0.0 };
    for r in &reports {
        let (status, body) = agg.post(&serde_json::to_vec(r).unwrap(), Some(AGENT_TOKEN));
        assert_eq!(status, 200, "report {}: {body}", r.seq);
    }
    let acme = [("tenant", "acme"), ("period", "day"), ("unit", "USD")];
    // Spend is refreshed off the ingest path: one refresh may have seen
    // only the first report. Wait for both (an undercount times out here),
    // then check the price (flat pricing would overshoot).
    let used = wait_for(
        &format!("acme's spend on /metrics to reach {want}"),
        Duration::from_secs(30),
        || {
            agg.metrics()
                .value("tally_tenant_budget_used", &acme)
                .filter(|v| *v >= want)
        },
    );
    assert_eq!(
        used,
        want,
        "hour {hour}: flat pricing would say {}",
        DAY_PRICE * reports.len() as f64
    );
}
