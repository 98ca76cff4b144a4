#!/bin/sh
# Slurm Epilog for Tally: removes the record prolog.sh wrote for the job.
# Exits 0 whatever happens (a failing Epilog drains the node).
PATH=/usr/bin:/bin
dir="${TALLY_SLURM_JOBS_DIR:-/var/lib/tally/slurm-jobs}"
id="${SLURM_JOB_ID:-}"
case "$id" in
  '' | *[!0-9]*) exit 0 ;;
esac
rm -f "$dir/$id" || echo "tally epilog: cannot remove $dir/$id" >&2
exit 0
