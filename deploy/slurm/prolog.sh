#!/bin/sh
# Slurm Prolog for Tally (slurm.conf: Prolog=/etc/tally/slurm/prolog.sh, or
# one script of a Prolog directory). Records the job's account and user
# for the node's Tally agent, whose `[[tenant.rule]] slurm = true` makes the
# account the tenant of every process in the job's cgroup (job_<id>), so
# the agent never asks slurmctld. The epilog removes the record.
#
# A failing Prolog drains the node: this script reports a problem on
# stderr (slurmd's log) and exits 0 whatever happens.
#
# TALLY_SLURM_JOBS_DIR: where the agent looks (its rule's `jobs_dir`),
# default /var/lib/tally/slurm-jobs (<agent.state_dir>/slurm-jobs).
PATH=/usr/bin:/bin
dir="${TALLY_SLURM_JOBS_DIR:-/var/lib/tally/slurm-jobs}"
id="${SLURM_JOB_ID:-}"
case "$id" in
  '' | *[!0-9]*) echo "tally prolog: SLURM_JOB_ID '$id' is not a job id; nothing recorded" >&2; exit 0 ;;
esac
# TOML basic strings: backslash and double quote escaped, control
# characters dropped (they are no tenant name anyway).
toml() { printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g'; }
tmp="$dir/.$id.tmp"
if mkdir -p "$dir" \
   && printf 'account = "%s"\nuser = "%s"\n' \
        "$(toml "${SLURM_JOB_ACCOUNT:-}")" "$(toml "${SLURM_JOB_USER:-}")" > "$tmp" \
   && mv -f "$tmp" "$dir/$id"; then
  exit 0
fi
echo "tally prolog: cannot record job $id in $dir; its GPU use goes to the agent's next tenant rule" >&2
rm -f "$tmp"
exit 0
