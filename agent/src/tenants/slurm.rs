//! Slurm jobs as tenants (`[[tenant.rule]] slurm = true`): slurmd puts
//! each job's processes in a cgroup named `job_<id>` (cgroup v2:
//! `/system.slice/slurmstepd.scope/job_<id>/step_<n>/user/task_<t>`; v1
//! layout: `/slurm/uid_<uid>/job_<id>/step_<n>/task_<t>`), and the job's
//! account is its tenant. The account comes from a record the prolog that
//! `deploy/slurm/` ships writes into the agent's state directory
//! (`<jobs_dir>/<id>`, `account = "…"` and `user = "…"`), removed by the
//! epilog, so the sampler never asks slurmctld.

use std::path::Path;

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

/// The tenant of the job a cgroup belongs to: its account, else its user;
/// `None` (the next rule) outside a job cgroup or without a usable record.
pub fn tenant(jobs_dir: &Path, cgroup: &str) -> Option<String> {
    let id = job_id(cgroup)?;
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
        let t = |cgroup: &str| tenant(dir.path(), cgroup);
        assert_eq!(t("/slurm/uid_0/job_1/step_0").as_deref(), Some("physics"));
        assert_eq!(t("/slurm/uid_0/job_2/step_0").as_deref(), Some("bob"));
        assert_eq!(t("/slurm/uid_0/job_3/step_0"), None, "a bad record");
        assert_eq!(t("/slurm/uid_0/job_4/step_0"), None, "no record");
        assert_eq!(t("/system.slice/sshd.service"), None, "not a job");
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
