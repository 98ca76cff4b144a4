//! `tally run`: start a command in a tenant's cgroup, with its limits.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    process::{Command, ExitCode},
};

use crate::enforce::{
    Settings,
    cgroup::{Layout, TenantTree, check_name},
    under_kubernetes,
};

/// `sysexits.h`: cannot create cgroups (not root, no hierarchy).
const EX_OSERR: u8 = 71;

/// Starts `command` inside `<parent>/tally/<tenant>/<job>` on every cgroup
/// hierarchy a job uses, by moving this process there and exec'ing. With a
/// config that has a quota for the tenant, its cpu / memory / pids limits
/// are written first (as the agent does), except under Kubernetes.
pub fn run(
    settings: &Settings<'_>,
    tenant: &str,
    job: Option<&str>,
    command: &[OsString],
) -> ExitCode {
    if let Err(msg) = tally_contract::tenant::check_tenant_name(tenant) {
        eprintln!("tally run: --tenant: {msg}");
        return ExitCode::from(tally_contract::config::EX_USAGE);
    }
    let job = job.map_or_else(|| format!("job-{}", std::process::id()), str::to_owned);
    if let Err(e) = check_name(tenant).and_then(|()| check_name(&job)) {
        eprintln!("tally run: {e}");
        return ExitCode::from(tally_contract::config::EX_USAGE);
    }
    let Some((program, args)) = command.split_first() else {
        eprintln!("tally run: no command given (tally run --tenant T -- CMD ARGS…)");
        return ExitCode::from(tally_contract::config::EX_USAGE);
    };
    let layout = match Layout::detect() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tally run: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    let tree = TenantTree::new(layout, settings.cgroup_parent.map(str::to_owned));
    if let Err(e) = tree.ensure_tenant(tenant) {
        eprintln!("tally run: cannot create the cgroup of tenant `{tenant}`: {e}");
        return ExitCode::from(EX_OSERR);
    }
    if let Some(quota) = settings.quotas.get(tenant)
        && !under_kubernetes()
    {
        for (resource, result) in tree.apply_limits(tenant, quota) {
            if let Err(e) = result {
                eprintln!("tally run: warning: {resource} limit of `{tenant}` not applied: {e}");
            }
        }
    }
    if let Err(e) = tree.join(tenant, &job, std::process::id()) {
        eprintln!("tally run: cannot enter tally/{tenant}/{job}: {e}");
        return ExitCode::from(EX_OSERR);
    }
    // Only returns on failure.
    let err = Command::new(program).args(args).exec();
    eprintln!("tally run: cannot run {}: {err}", program.to_string_lossy());
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}
