//! The chargeback as FinOps tools take it: a real `tally aggregator` on
//! SQLite with a few reports ingested; its `format=focus` passes the FinOps
//! `focus-validator` (FOCUS 1.2) with no failed mandatory rule, for every
//! grouping and with time-of-use energy prices, and its CSV and JSON lines
//! equal the FOCUS rows item by item, to the cent.
//!
//! The validator is installed into a venv under `target/focus/` when
//! missing (as `tests/ops/run.sh` installs its tools); when no Python
//! ≥ 3.12 or no package index can be had, the validation says SKIPPED with
//! the reason and the cross-format checks still run.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use tally_contract::wire::{GpuGauge, GpuUsage, IoUsage, Report, SCHEMA_VERSION};
use tally_e2e::{
    aggregator_support::{ADMIN_TOKEN, AGENT_TOKEN, Aggregator, sqlite},
    skip, target_dir,
};

const REQUIREMENTS: &str = include_str!("../focus-requirements.txt");
/// 2023-11-14T22:13:20Z: reports are placed in a fixed period.
const T0_MS: u64 = 1_700_000_000_000;

fn usage(tenant: &str, uuid: &str, model: &str, slice: f64, seconds: u64) -> GpuUsage {
    GpuUsage {
        tenant: tenant.into(),
        gpu: uuid.into(),
        uuid: uuid.into(),
        model: model.into(),
        mig_profile: (slice < 1.0).then(|| "3g.20gb".into()),
        slice_fraction: slice,
        allocated_us: seconds * 1_000_000,
        sm_us: Some(seconds * 400_000),
        memory_byte_seconds: seconds << 30,
        energy_mj: seconds * 300_000,
        workload: None,
        // A quarter held idle: the idle columns are validated too.
        idle_us: seconds * 250_000,
    }
}

fn io(tenant: &str, network: u64, pcie: u64) -> IoUsage {
    IoUsage {
        tenant: tenant.into(),
        network_ingress_bytes: network,
        network_egress_bytes: network / 2,
        pcie_h2d_bytes: pcie,
        pcie_d2h_bytes: pcie / 3,
        ..Default::default()
    }
}

/// Two nodes in two clusters, two tenants, full GPUs and a MIG slice, a
/// named workload, network and PCIe.
fn reports() -> Vec<Report> {
    let h100 = "NVIDIA H100 80GB HBM3";
    let a100 = "NVIDIA A100-SXM4-40GB";
    let mut out = Vec::new();
    for seq in 1..=3u64 {
        let start = T0_MS + (seq - 1) * 60_000;
        out.push(Report {
            version: SCHEMA_VERSION,
            node: "n1".into(),
            boot_id: "boot-1".into(),
            seq,
            interval_start_ms: start,
            interval_end_ms: start + 60_000,
            gpu_usage: vec![
                GpuUsage {
                    workload: Some("train-1".into()),
                    ..usage("acme", "GPU-n1-0", h100, 1.0, 40)
                },
                usage("acme", "GPU-n1-0", h100, 1.0, 20),
                usage("beta", "MIG-n1-1-0", a100, 3.0 / 7.0, 45),
            ],
            io_usage: vec![io("acme", 3 << 30, 5 << 30), io("beta", 1 << 29, 0)],
            gpus: vec![GpuGauge {
                gpu: "0".into(),
                uuid: "GPU-n1-0".into(),
                model: h100.into(),
                health: "ok".into(),
                ..Default::default()
            }],
            audit: vec![],
            report_interval_ms: Some(60_000),
            tenant_quotas: vec![],
            cluster: None,
        });
    }
    out.push(Report {
        version: SCHEMA_VERSION,
        node: "n2".into(),
        boot_id: "boot-2".into(),
        seq: 1,
        interval_start_ms: T0_MS,
        interval_end_ms: T0_MS + 120_000,
        gpu_usage: vec![usage("acme", "GPU-n2-0", "Tesla T4", 1.0, 120)],
        io_usage: vec![io("acme", 0, 1 << 30)],
        gpus: vec![],
        audit: vec![],
        report_interval_ms: Some(120_000),
        tenant_quotas: vec![],
        cluster: Some("prod-us".into()),
    });
    out
}

/// A CSV body as rows of column → value.
fn parse_csv(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let header = r.headers().expect("CSV header").clone();
    r.records()
        .map(|rec| {
            let rec = rec.expect("CSV record");
            header
                .iter()
                .zip(rec.iter())
                .map(|(h, v)| (h.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// A decimal amount in minor units (`"12.34"` → 1234, two decimals).
fn cents(s: &str) -> i64 {
    (s.parse::<f64>()
        .unwrap_or_else(|e| panic!("`{s}` is not an amount: {e}"))
        * 100.0)
        .round() as i64
}

fn expected_resource_type(sku: &str) -> &'static str {
    match sku {
        s if s.starts_with("gpu-hour:") => "GPU",
        "energy-kwh" => "Energy",
        "network-gib" => "Network",
        "pcie-gib" => "PCIe",
        other => panic!("unknown SKU {other}"),
    }
}

/// The FOCUS rows, the CSV lines and the JSON lines of one query say the
/// same, item by item and to the cent.
fn formats_agree(json: &serde_json::Value, csv: &str, focus: &str, what: &str) {
    let lines = json["lines"].as_array().expect("lines");
    let focus = parse_csv(focus);
    let csv = parse_csv(csv);
    assert_eq!(csv.len(), lines.len(), "{what}: one CSV row per JSON line");
    let items: Vec<(&serde_json::Value, &serde_json::Value)> = lines
        .iter()
        .flat_map(|l| l["items"].as_array().unwrap().iter().map(move |i| (l, i)))
        .collect();
    assert_eq!(
        focus.len(),
        items.len(),
        "{what}: one FOCUS row per priced item"
    );
    assert!(!focus.is_empty(), "{what}: the ingested usage is charged");
    for ((line, item), row) in items.iter().zip(&focus) {
        let sku = item["sku"].as_str().unwrap();
        assert_eq!(row["SkuId"], sku, "{what}: rows in item order");
        assert_eq!(
            cents(&row["BilledCost"]),
            item["cost_minor"].as_i64().unwrap(),
            "{what}: {sku} of {}",
            line["tenant"]
        );
        assert_eq!(row["BilledCost"], item["cost"].as_str().unwrap());
        assert_eq!(
            row["x_IdleCost"],
            item["idle_cost"].as_str().unwrap_or(""),
            "{what}: idle cost of {sku}"
        );
        assert_eq!(row["EffectiveCost"], row["BilledCost"]);
        assert_eq!(row["SubAccountId"], line["tenant"].as_str().unwrap());
        assert_eq!(row["ResourceType"], expected_resource_type(sku), "{what}");
        assert!(
            !row["ResourceId"].is_empty(),
            "{what}: ResourceId of {row:?}"
        );
        if let Some(node) = line["node"].as_str() {
            assert!(row["ResourceId"].starts_with(node), "{what}: {row:?}");
        }
        if let Some(cluster) = line["cluster"].as_str() {
            assert_eq!(
                row["RegionId"], cluster,
                "{what}: the cluster is the region"
            );
            assert!(row["ResourceId"].starts_with(cluster), "{what}: {row:?}");
        }
        for col in [
            "BillingAccountId",
            "BillingAccountName",
            "ProviderName",
            "PublisherName",
            "InvoiceIssuerName",
        ] {
            assert!(!row[col].is_empty(), "{what}: {col} of {row:?}");
        }
        assert_eq!(row["ProviderName"], "Tally", "{what}: the default provider");
    }
    for (line, row) in lines.iter().zip(&csv) {
        assert_eq!(row["tenant"], line["tenant"].as_str().unwrap(), "{what}");
        for col in [
            "gpu_cost",
            "energy_cost",
            "network_cost",
            "pcie_cost",
            "cost",
            "idle_cost",
        ] {
            assert_eq!(row[col], line[col].as_str().unwrap(), "{what}: {col}");
        }
        let idle_cents: i64 = items
            .iter()
            .zip(&focus)
            .filter(|((l, _), _)| std::ptr::eq(*l, line))
            .filter(|(_, r)| !r["x_IdleCost"].is_empty())
            .map(|(_, r)| cents(&r["x_IdleCost"]))
            .sum();
        assert_eq!(
            cents(&row["idle_cost"]),
            idle_cents,
            "{what}: the CSV line's idle cost is the sum of its FOCUS rows'"
        );
        let focus_cents: i64 = items
            .iter()
            .zip(&focus)
            .filter(|((l, _), _)| std::ptr::eq(*l, line))
            .map(|(_, r)| cents(&r["BilledCost"]))
            .sum();
        assert_eq!(
            cents(&row["cost"]),
            focus_cents,
            "{what}: the CSV line of {} is the sum of its FOCUS rows",
            row["tenant"]
        );
    }
    let total: i64 = focus.iter().map(|r| cents(&r["BilledCost"])).sum();
    assert_eq!(
        total,
        json["total_minor"].as_i64().unwrap(),
        "{what}: total"
    );
}

/// `focus-validator` installed in a venv: (its script, the directory it
/// must run in — its rule files are found relative to site-packages).
struct Validator {
    bin: PathBuf,
    site_packages: PathBuf,
}

/// A Python ≥ 3.12 (focus-validator 2.2.1 needs it): `$TALLY_FOCUS_PYTHON`,
/// else the oldest such minor version on the PATH or in pyenv's versions —
/// the validator's pinned numpy has wheels for 3.12, a newer Python
/// builds it from source for minutes.
fn python() -> Option<PathBuf> {
    let minor = |p: &Path| -> Option<u32> {
        let out = Command::new(p)
            .args([
                "-c",
                "import sys; print(sys.version_info[0] * 1000 + sys.version_info[1])",
            ])
            .output()
            .ok()?;
        let v: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        (out.status.success() && v >= 3012).then_some(v)
    };
    if let Some(p) = std::env::var_os("TALLY_FOCUS_PYTHON").map(PathBuf::from) {
        return minor(&p).map(|_| p);
    }
    let mut candidates: Vec<PathBuf> = ["python3.12", "python3.13", "python3"]
        .map(PathBuf::from)
        .into();
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(Ok(versions)) = pyenv.map(|p| fs::read_dir(p.join("versions"))) {
        candidates.extend(versions.flatten().map(|e| e.path().join("bin/python3")));
    }
    candidates
        .into_iter()
        .filter_map(|p| minor(&p).map(|v| (v, p)))
        .min_by_key(|(v, _)| *v)
        .map(|(_, p)| p)
}

/// The validator, installed when missing or when the pinned requirements
/// changed; `Err` says why it cannot be had.
fn validator() -> Result<Validator, String> {
    let dir = target_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .join("focus");
    let venv = dir.join("venv");
    let stamp = venv.join(".requirements");
    let bin = venv.join("bin/focus-validator");
    if !(bin.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == REQUIREMENTS)) {
        let python = python().ok_or("no Python ≥ 3.12 (set TALLY_FOCUS_PYTHON)")?;
        eprintln!(
            "focus: creating {} with {}",
            venv.display(),
            python.display()
        );
        let _ = fs::remove_dir_all(&venv);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let requirements = dir.join("requirements.txt");
        fs::write(&requirements, REQUIREMENTS).map_err(|e| e.to_string())?;
        let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
            if out.status.success() {
                return Ok(());
            }
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            Err(format!("{what} failed: {}", tail.join(" / ")))
        };
        run(
            Command::new(&python).arg("-m").arg("venv").arg(&venv),
            "python -m venv",
        )?;
        run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "--disable-pip-version-check", "-r"])
                .arg(&requirements),
            "pip install focus-validator",
        )?;
        // Written last: a half-built venv is rebuilt next time.
        fs::write(&stamp, REQUIREMENTS).map_err(|e| e.to_string())?;
    }
    let site_packages = fs::read_dir(venv.join("lib"))
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join("focus_validator").is_dir())
        .ok_or("focus_validator is not in the venv's site-packages")?;
    Ok(Validator { bin, site_packages })
}

/// Runs the validator on `file`; returns its `Total:` line and the
/// mandatory rules (`…-M`) that failed, with their messages.
fn validate(v: &Validator, file: &Path) -> (String, Vec<String>) {
    let out = Command::new(&v.bin)
        .arg("--data-file")
        .arg(file)
        .args(["--validate-version", "1.2", "--block-download"])
        .current_dir(&v.site_packages)
        .output()
        .expect("run focus-validator");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let total = text
        .lines()
        .find(|l| l.starts_with("Total:"))
        .unwrap_or_else(|| {
            panic!(
                "focus-validator printed no `Total:` ({}):\n{text}",
                out.status
            )
        })
        .to_owned();
    let failed = text
        .lines()
        .filter(|l| l.contains("❌") && l.contains("-M: FAIL"))
        .map(|l| l.trim().to_owned())
        .collect();
    (total, failed)
}

#[test]
fn focus_validates_and_every_format_agrees_to_the_cent() {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), "");
    for r in reports() {
        let (status, body) = agg.post(&serde_json::to_vec(&r).unwrap(), Some(AGENT_TOKEN));
        assert_eq!(status, 200, "report {} {}: {body}", r.node, r.seq);
    }
    let period = format!("from={}&to={}", T0_MS / 1000 - 60, T0_MS / 1000 + 3600);
    let validator = validator();
    if let Err(why) = &validator {
        skip(&format!(
            "focus-validator unavailable ({why}); only the formats were compared"
        ));
    }
    for group_by in [
        "tenant",
        "tenant,gpu_model",
        "tenant,node",
        "tenant,workload",
        "cluster,tenant",
        "cluster,tenant,workload",
    ] {
        for basis in ["allocated", "used"] {
            let what = format!("group_by={group_by} basis={basis}");
            let q = format!("{period}&group_by={group_by}&basis={basis}");
            let json = agg.chargeback(&q);
            let get = |format: &str| {
                let (status, body) = agg.get(
                    &format!("/api/v1/chargeback?{q}&format={format}"),
                    Some(ADMIN_TOKEN),
                );
                assert_eq!(status, 200, "{what} format={format}: {body}");
                body
            };
            let (csv, focus) = (get("csv"), get("focus"));
            formats_agree(&json, &csv, &focus, &what);

            // The basis changes amounts, not columns: one validation per
            // grouping is enough.
            let Ok(v) = &validator else { continue };
            if basis != "allocated" {
                continue;
            }
            let file = dir
                .path()
                .join(format!("focus-{}-{basis}.csv", group_by.replace(',', "-")));
            fs::write(&file, &focus).unwrap();
            let (total, failed) = validate(v, &file);
            eprintln!("focus-validator, {what}: {total}");
            assert!(
                failed.is_empty(),
                "{what}: FOCUS 1.2 mandatory rules failed ({total}):\n{}\nfile {}:\n{focus}",
                failed.join("\n"),
                file.display()
            );
        }
    }

    // Time-of-use energy: a report an hour later, after midnight in Paris,
    // priced at the night's price; each price is an item (and a FOCUS
    // SkuPriceId) of its own.
    let mut late = reports().remove(2);
    late.seq = 4;
    late.interval_start_ms += 60_000;
    late.interval_end_ms += 3_600_000;
    let (status, body) = agg.post(&serde_json::to_vec(&late).unwrap(), Some(AGENT_TOKEN));
    assert_eq!(status, 200, "late report: {body}");
    agg.stop();
    let config = fs::read_to_string(&agg.config).unwrap();
    fs::write(
        &agg.config,
        config.replace(
            "energy_kwh = 1000.0",
            "energy_kwh = { default = 1000.0, \"00:00-06:00\" = 400.0 }\ntimezone = \"Europe/Paris\"",
        ),
    )
    .unwrap();
    agg.restart();
    let q = format!(
        "from={}&to={}&group_by=tenant",
        T0_MS / 1000 - 60,
        T0_MS / 1000 + 7200
    );
    let json = agg.chargeback(&q);
    let get = |format: &str| {
        let (status, body) = agg.get(
            &format!("/api/v1/chargeback?{q}&format={format}"),
            Some(ADMIN_TOKEN),
        );
        assert_eq!(status, 200, "time of use, format={format}: {body}");
        body
    };
    let (csv, focus) = (get("csv"), get("focus"));
    formats_agree(&json, &csv, &focus, "time of use");
    for price in ["energy-kwh@1000", "energy-kwh@400"] {
        assert!(focus.contains(price), "{price} missing:\n{focus}");
    }
    if let Ok(v) = &validator {
        let file = dir.path().join("focus-time-of-use.csv");
        fs::write(&file, &focus).unwrap();
        let (total, failed) = validate(v, &file);
        eprintln!("focus-validator, time of use: {total}");
        assert!(
            failed.is_empty(),
            "time of use: FOCUS 1.2 mandatory rules failed ({total}):\n{}\n{focus}",
            failed.join("\n")
        );
    }
}
