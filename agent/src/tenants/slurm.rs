//! Slurm jobs as tenants (`[[tenant.rule]] slurm = true`): slurmd puts
//! each job's processes in a cgroup named `job_<id>` (cgroup v2:
//! `/system.slice/slurmstepd.scope/job_<id>/step_<n>/user/task_<t>`; v1
//! layout: `/slurm/uid_<uid>/job_<id>/step_<n>/task_<t>`), and the job's
//! account is its tenant. The account comes from a record the prolog that
//! `deploy/slurm/` ships writes into the agent's state directory
//! (`<jobs_dir>/<id>`, `account = "…"` and `user = "…"`), removed by the
//! epilog, so the sampler never asks slurmctld. A job's record is read
//! once per [`REREAD`] ([`Jobs`]), not once per cgroup or process asking.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tally_contract::tenant::check_tenant_name;

/// The job records' directory beneath the state directory.
pub const JOBS_DIR: &str = "slurm-jobs";

/// The Slurm job id of a cgroup path, in either slurmd layout.
pub fn job_id(cgroup: &str) -> Option<u64> {
    cgroup
        .split('/')
        .filter_map(|c| c.strip_prefix("job_"))
        .find_map(|id| id.parse().ok())
}

/// What the prolog recorded about one job.
#[derive(Debug, Deserialize, PartialEq)]
struct JobRecord {
    #[serde(default)]
    account: String,
    #[serde(default)]
    user: String,
}

/// How long what a job's record said is trusted. The prolog writes a
/// record once and the epilog removes it, so within a job it holds; reading
/// it again after this sees a prolog that ran late or a record fixed by hand.
const REREAD: Duration = Duration::from_secs(15);

/// Above this many jobs remembered, those not read within [`REREAD`] go
/// (ended jobs are never asked about again).
const PRUNE_ABOVE: usize = 1024;

/// The tenants of jobs read lately, by job id, for one `slurm` rule: the
/// eBPF probes ask for every job cgroup they count, each cycle, and a
/// process cache that cannot reuse a tenant (Kubernetes on too) asks per
/// process per cycle; without this, each ask read and parsed the record
/// (and logged a bad one) again.
#[derive(Debug, Default)]
pub struct Jobs {
    read: Mutex<HashMap<u64, Read>>,
}

/// When a job's record was read, and the tenant it gave.
type Read = (Instant, Option<Arc<str>>);

impl Jobs {
    /// The tenant of the job a cgroup belongs to: its account, else its
    /// user; `None` (the next rule) outside a job cgroup or without a
    /// usable record. From memory when this job's record was read lately.
    pub fn tenant(&self, jobs_dir: &Path, cgroup: &str) -> Option<Arc<str>> {
        self.tenant_at(jobs_dir, cgroup, Instant::now())
    }

    fn tenant_at(&self, jobs_dir: &Path, cgroup: &str, now: Instant) -> Option<Arc<str>> {
        let id = job_id(cgroup)?;
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, tenant)) = read.get(&id)
            && now.saturating_duration_since(*at) < REREAD
        {
            return tenant.clone();
        }
        let tenant = record_tenant(jobs_dir, id).map(Arc::from);
        if read.len() >= PRUNE_ABOVE {
            read.retain(|_, (at, _)| now.saturating_duration_since(*at) < REREAD);
        }
        read.insert(id, (now, tenant.clone()));
        tenant
    }
}

/// The tenant in job `id`'s record, read now.
fn record_tenant(jobs_dir: &Path, id: u64) -> Option<String> {
    let text = std::fs::read_to_string(jobs_dir.join(id.to_string())).ok()?;
    let record: JobRecord = match toml::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(job = id, error = %e, "unreadable Slurm job record; next tenant rule");
            return None;
        }
    };
    [record.account, record.user]
        .into_iter()
        .find(|t| check_tenant_name(t).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_come_from_both_slurmd_layouts() {
        let v2 = "/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0";
        let v1 = "/slurm/uid_1000/job_77/step_batch/task_0";
        assert_eq!(job_id(v2), Some(4242));
        assert_eq!(job_id(v1), Some(77));
        assert_eq!(job_id("/system.slice/slurmstepd.scope/system"), None);
        assert_eq!(job_id("/user.slice/job_abc"), None);
    }

    #[test]
    fn the_account_is_the_tenant_and_the_user_stands_in() {
        let dir = tempfile::tempdir().unwrap();
        let write = |id: &str, text: &str| std::fs::write(dir.path().join(id), text).unwrap();
        write("1", "account = \"physics\"\nuser = \"alice\"\n");
        write("2", "account = \"\"\nuser = \"bob\"\n");
        write("3", "account = [1]\n");
        let t = |cgroup: &str| Jobs::default().tenant(dir.path(), cgroup);
        assert_eq!(t("/slurm/uid_0/job_1/step_0").as_deref(), Some("physics"));
        assert_eq!(t("/slurm/uid_0/job_2/step_0").as_deref(), Some("bob"));
        assert_eq!(t("/slurm/uid_0/job_3/step_0"), None, "a bad record");
        assert_eq!(t("/slurm/uid_0/job_4/step_0"), None, "no record");
        assert_eq!(t("/system.slice/sshd.service"), None, "not a job");
    }

    #[test]
    fn a_record_is_read_once_per_reread_period() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("5");
        std::fs::write(&record, "account = \"physics\"\n").unwrap();
        let jobs = Jobs::default();
        let t0 = Instant::now();
        let at = |cgroup: &str, after: Duration| {
            jobs.tenant_at(dir.path(), cgroup, t0 + after)
                .map(|t| t.to_string())
        };
        let step = "/slurm/uid_0/job_5/step_0/task_0";
        assert_eq!(at(step, Duration::ZERO).as_deref(), Some("physics"));
        // Changed on disk: another cgroup of the job, soon after, is
        // answered from memory.
        std::fs::write(&record, "account = \"chemistry\"\n").unwrap();
        let batch = "/slurm/uid_0/job_5/step_batch/task_0";
        assert_eq!(
            at(batch, Duration::from_secs(1)).as_deref(),
            Some("physics")
        );
        assert_eq!(at(step, REREAD).as_deref(), Some("chemistry"));
        // The epilog removed it: gone at the next read.
        std::fs::remove_file(&record).unwrap();
        assert_eq!(at(step, 2 * REREAD), None);
        assert_eq!(at("/system.slice/sshd.service", Duration::ZERO), None);
    }

    #[test]
    fn jobs_not_read_lately_are_forgotten_once_many_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::default();
        let t0 = Instant::now();
        for id in 0..PRUNE_ABOVE {
            jobs.tenant_at(dir.path(), &format!("/job_{id}/"), t0);
        }
        jobs.tenant_at(dir.path(), "/job_999999/", t0 + REREAD);
        assert_eq!(jobs.read.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_rule_finds_its_records_beside_the_state_and_names_mistakes() {
        use crate::{config::Config, tenants::rules::TenantRule};
        let c = Config::parse(
            "[agent]\nstate_dir = \"/srv/tally\"\n[[tenant.rule]]\nslurm = true\n",
            Path::new("a.toml"),
        )
        .unwrap();
        let TenantRule::Slurm { jobs_dir } = &c.tenant.rules[0] else {
            panic!("{:?}", c.tenant.rules);
        };
        assert_eq!(jobs_dir, Path::new("/srv/tally/slurm-jobs"));
        let e = Config::parse(
            "[[tenant.rule]]\nslurm = true\nuser = true\n\
             [[tenant.rule]]\njobs_dir = \"/x\"\n\
             [[tenant.rule]]\nslurm = true\njobs_dir = \"relative\"\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        for want in [
            "tenant.rule[0].user",
            "tenant.rule[1].slurm",
            "tenant.rule[2].jobs_dir",
        ] {
            assert!(e.contains(want), "{want} missing from:\n{e}");
        }
    }
}
