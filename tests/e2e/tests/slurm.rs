//! Slurm jobs as tenants, on real cgroups shaped as slurmd makes them
//! (beneath this test's own cgroup): `deploy/slurm/prolog.sh` records each
//! job's account and user, the agent's `slurm = true` rule charges the
//! job's GPU use to its account (its user without one) in either slurmd
//! layout, with the job id as the workload in the aggregator's
//! chargeback, a job without a record falls to the next rule, and the
//! epilog removes the record.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tally_e2e::{
    Agent, Cgroup, Metrics, SimNode,
    aggregator_support::{Aggregator, agent_config, sqlite},
    now_ms, require_root, unique, wait_for,
};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../deploy/slurm/{name}"))
}

/// Runs a prolog or epilog as slurmd would: root, job variables only.
fn run_as_slurmd(name: &str, jobs_dir: &Path, vars: &[(&str, &str)]) -> std::process::Output {
    let out = Command::new(script(name))
        .env_clear()
        .env("TALLY_SLURM_JOBS_DIR", jobs_dir)
        .envs(vars.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} must always exit 0 (a failure drains the node): {out:?}"
    );
    out
}

fn gpu_seconds(m: &Metrics, tenant: &str) -> f64 {
    m.sum(
        "tally_tenant_gpu_allocated_seconds_total",
        &[("tenant", tenant)],
    )
}

#[test]
fn a_job_is_charged_to_its_account_in_both_slurmd_layouts() {
    if !require_root() {
        return;
    }
    let node = SimNode::standard();
    let state = tempfile::tempdir().unwrap();
    let jobs = state.path().join("slurm-jobs");

    // Job 4242 (account physics), job 4243 (no account: its user), and
    // job 4244, whose prolog never ran.
    run_as_slurmd(
        "prolog.sh",
        &jobs,
        &[
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_JOB_ACCOUNT", "physics"),
            ("SLURM_JOB_USER", "alice"),
        ],
    );
    run_as_slurmd(
        "prolog.sh",
        &jobs,
        &[("SLURM_JOB_ID", "4243"), ("SLURM_JOB_USER", "bob")],
    );
    let bad = run_as_slurmd("prolog.sh", &jobs, &[("SLURM_JOB_ID", "../etc")]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a job id"));
    let recorded = std::fs::read_to_string(jobs.join("4242")).unwrap();
    assert_eq!(recorded, "account = \"physics\"\nuser = \"alice\"\n");
    // Names are written as TOML strings, whatever they hold.
    run_as_slurmd(
        "prolog.sh",
        &jobs,
        &[("SLURM_JOB_ID", "9"), ("SLURM_JOB_ACCOUNT", "a\"b\\c")],
    );
    assert_eq!(
        std::fs::read_to_string(jobs.join("9")).unwrap(),
        "account = \"a\\\"b\\\\c\"\nuser = \"\"\n"
    );
    run_as_slurmd("epilog.sh", &jobs, &[("SLURM_JOB_ID", "9")]);
    let mut names: Vec<_> = std::fs::read_dir(&jobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["4242", "4243"], "nothing else written");

    let base = unique("e2e-slurm");
    let v2 = Cgroup::create(&format!(
        "{base}/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0"
    ));
    let v1 = Cgroup::create(&format!("{base}/slurm/uid_0/job_4243/step_batch/task_0"));
    let unrecorded = Cgroup::create(&format!(
        "{base}/system.slice/slurmstepd.scope/job_4244/step_0/user/task_0"
    ));
    let procs = [
        v2.spawn("sleep", &["600"]),
        v1.spawn("sleep", &["600"]),
        unrecorded.spawn("sleep", &["600"]),
    ];
    // GPU 0 for job 4242; GPU 1 shared by the other two (GPU 2 is in MIG
    // mode in the standard scenario).
    for (p, gpu) in procs.iter().zip([0, 1, 1]) {
        node.register(p.pid(), gpu, None, 4096, 0.3);
    }
    let agg_dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&agg_dir.path().join("agg"), &sqlite(agg_dir.path()), "");
    let config = agent_config(
        &agg.url(),
        "n1",
        state.path(),
        &agg_dir.path().join("agg"),
        "\n[[tenant.rule]]\nslurm = true\n\n\
         [[tenant.rule]]\ncgroup = '/job_(?P<tenant>4244)/'\n",
    );
    let agent = Agent::start(&node, &config, &["--sample-interval", "200ms"]);
    let m = wait_for(
        "the jobs' tenants on /metrics",
        Duration::from_secs(30),
        || {
            let m = agent.metrics();
            ["physics", "bob", "4244"]
                .iter()
                .all(|t| gpu_seconds(&m, t) > 0.0)
                .then_some(m)
        },
    );
    assert!(
        m.value(
            "tally_tenant_gpu_allocated_seconds_total",
            &[("tenant", "physics"), ("gpu", "0")]
        )
        .is_some_and(|s| s > 0.0),
        "job 4242 (v2 layout) is physics' on GPU 0"
    );
    for absent in ["alice", "_unattributed"] {
        assert_eq!(gpu_seconds(&m, absent), 0.0, "{absent} was charged");
    }

    // The epilog removes the record; a second run is harmless.
    for _ in 0..2 {
        run_as_slurmd("epilog.sh", &jobs, &[("SLURM_JOB_ID", "4242")]);
    }
    assert!(!jobs.join("4242").exists());
    assert!(jobs.join("4243").exists());
    assert!(agent.stop().success());

    // The job id is the workload of the job's usage; a tenant from
    // another rule has none.
    let c = agg.chargeback(&format!(
        "from=0&to={}&group_by=tenant,workload",
        now_ms() / 1000 + 3600
    ));
    let mut lines: Vec<(String, String)> = c["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["gpu_hours"].as_f64().unwrap() > 0.0)
        .map(|l| {
            (
                l["tenant"].as_str().unwrap().to_owned(),
                l["workload"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(t, _)| ["physics", "bob", "4244"].contains(&t.as_str()))
        .collect();
    lines.sort();
    let expected: Vec<(String, String)> = [("4244", ""), ("bob", "4243"), ("physics", "4242")]
        .iter()
        .map(|(t, w)| ((*t).to_owned(), (*w).to_owned()))
        .collect();
    assert_eq!(lines, expected, "{c}");
}
