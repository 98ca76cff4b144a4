#!/usr/bin/env bash
# Tally against a real GPU: what Tally reports, next to what the driver's
# own tool (nvidia-smi) says at the same moments. See README.md beside it.
#
#   sudo ./check.sh --tally ./tally --out out
#
# Needs only bash, coreutils, the NVIDIA driver and the files of
# `cargo xtask dist` (target/dist/): no jq, python or curl (HTTP goes through
# bash's /dev/tcp). Writes OUT/report.md (check | Tally | nvidia-smi |
# verdict), OUT/metrics-*.txt and the raw outputs; exits 1 on any mismatch,
# 2 when it cannot run at all. It never changes a GPU setting (it only runs
# `nvidia-smi --query-*`, `-L` and `dmon`), and it ends every process and
# removes every cgroup, pin directory and temporary file it made (trap).
#
# Without nvidia-smi (e.g. against the NVML simulator, `--nvml-lib`), the
# parts that need it are reported as skipped and the rest runs.

set -uo pipefail
shopt -s extglob
export LC_ALL=C

usage() {
	cat <<'EOF'
usage: check.sh --tally PATH --out DIR [options]
  --tally PATH        the tally binary to check (target/dist/tally)
  --out DIR           where report.md, metrics-*.txt and raw outputs go
  --nvml-lib PATH     NVML library for tally [default: the driver's libnvidia-ml.so.1]
  --seconds N         how long the agent runs and is scraped [60]
  --scrape-every N    seconds between scrapes [5]
  --hold-seconds N    how long the GPU-memory workload runs [20]
  --hold-cmd 'CMD'    workload to run in the test tenant's cgroup (split on spaces)
                      [default: gpu-hold beside this script, else python3 with torch]
  --cuda-lib PATH     CUDA driver library to probe and list [default: as tally finds it]
  --no-nvidia-smi     act as if nvidia-smi were absent (tests)
EOF
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TALLY=
OUT=
NVML_LIB=
RUN_SECONDS=60
SCRAPE_EVERY=5
HOLD_SECONDS=20
HOLD_CMD=
CUDA_LIB=
SMI=nvidia-smi
while (($#)); do
	case $1 in
	--tally) TALLY=$2 ;;
	--out) OUT=$2 ;;
	--nvml-lib) NVML_LIB=$2 ;;
	--seconds) RUN_SECONDS=$2 ;;
	--scrape-every) SCRAPE_EVERY=$2 ;;
	--hold-seconds) HOLD_SECONDS=$2 ;;
	--hold-cmd) HOLD_CMD=$2 ;;
	--cuda-lib) CUDA_LIB=$2 ;;
	--no-nvidia-smi) SMI= ; shift; continue ;;
	-h | --help) usage; exit 0 ;;
	*) echo "check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
	esac
	shift 2 || { echo "check.sh: $1 needs a value" >&2; exit 2; }
done
die() { echo "check.sh: $*" >&2; exit 2; }
[[ -n $TALLY && -n $OUT ]] || { usage >&2; exit 2; }
[[ -x $TALLY ]] || die "--tally $TALLY is not an executable"
TALLY=$(readlink -f "$TALLY")
((EUID == 0)) || die "run as root (eBPF probes, cgroups): sudo $0 …"
for n in "$RUN_SECONDS" "$SCRAPE_EVERY" "$HOLD_SECONDS"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || die "not a positive whole number of seconds: $n"
done
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(readlink -f "$OUT")
rm -f "$OUT"/metrics-*.txt "$OUT"/smi-*.csv "$OUT"/snapshot-*.json
if [[ -n $SMI ]] && ! command -v "$SMI" >/dev/null; then SMI=; fi

# ------------------------------------------------------------------ cleanup

WORK=$(mktemp -d /tmp/tally-gpucheck.XXXXXX) || die "mktemp failed"
PIN_DIR=/sys/fs/bpf/tally-gpucheck-$$
AGENT_PID=
HOLD_PID=
CGROUP_TOP=
cleanup() {
	if [[ -n $HOLD_PID ]]; then kill -KILL "$HOLD_PID" 2>/dev/null; wait "$HOLD_PID" 2>/dev/null; fi
	if [[ -n $CGROUP_TOP && -d $CGROUP_TOP ]]; then
		local dir pid
		for dir in "$CGROUP_TOP"/*/ "$CGROUP_TOP"/; do
			[[ -f $dir/cgroup.procs ]] || continue
			for _ in 1 2 3 4 5 6 7 8 9 10; do
				local any=
				while read -r pid; do any=1; kill -KILL "$pid" 2>/dev/null; done <"$dir/cgroup.procs"
				[[ -z $any ]] && break
				sleep 0.2
			done
			rmdir "$dir" 2>/dev/null
		done
	fi
	if [[ -n $AGENT_PID ]]; then
		kill -TERM "$AGENT_PID" 2>/dev/null
		for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$AGENT_PID" 2>/dev/null
		wait "$AGENT_PID" 2>/dev/null
	fi
	[[ -d $PIN_DIR ]] && rm -rf "$PIN_DIR"
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ results

ROWS=()
FAILED=0
SKIPPED=()
cell() { local s=${1//|/\\|}; printf '%s' "${s//$'\n'/ }"; }
# row CHECK TALLY NVIDIA-SMI VERDICT: one line of the report; a verdict of
# MISMATCH or FAIL makes the check fail.
row() {
	ROWS+=("| $(cell "$1") | $(cell "$2") | $(cell "$3") | $(cell "$4") |")
	case $4 in MISMATCH* | FAIL*) FAILED=$((FAILED + 1)) ;; skipped*) local why=${4#skipped (}; SKIPPED+=("$1: ${why%)}") ;; esac
	printf '%-44s %s\n' "$1" "$4"
}
NO_SMI="skipped (no nvidia-smi)"

# finish: writes OUT/report.md and exits 1 on any failed check.
finish() {
	local wall_total=$((($(now_ns) - ${T0:-$(now_ns)}) / 1000000000))
	{
		echo "# Tally on a real GPU: check report"
		echo
		echo "- tally: $("$TALLY" --version 2>/dev/null) ($TALLY)"
		echo "- host: $(uname -n), kernel $(uname -r), $(date -u +%FT%TZ)"
		echo "- NVML: ${NVML_LIB:-libnvidia-ml.so.1 of the driver}; nvidia-smi: ${SMI:-absent}${SMI_DRIVER:+, driver $SMI_DRIVER}"
		echo "- agent: ${RUN_SECONDS} s asked, $wall_total s measured, scraped every ${SCRAPE_EVERY} s ($SCRAPES scrapes: metrics-00.txt …)"
		echo "- workload: ${HOLD[*]:-none}"
		echo
		echo "| check | Tally | nvidia-smi | verdict |"
		echo "| --- | --- | --- | --- |"
		printf '%s\n' "${ROWS[@]}"
		echo
		if ((${#SKIPPED[@]})); then
			echo "Skipped:"
			printf -- '- %s\n' "${SKIPPED[@]}"
			echo
		fi
		if ((FAILED)); then echo "Result: FAILED ($FAILED checks)"; else echo "Result: passed"; fi
	} >"$OUT/report.md"
	echo "check.sh: wrote $OUT/report.md: ${#ROWS[@]} checks, $FAILED failed, ${#SKIPPED[@]} skipped"
	((FAILED == 0)) && exit 0
	exit 1
}

# micro VALUE: a decimal (with optional exponent) as a whole number of
# millionths, truncated; empty for NaN, Inf or anything else.
micro() {
	local v=$1 sign= exp=0 int frac digits point
	[[ $v == -* ]] && sign=- && v=${v#-}
	v=${v#+}
	if [[ $v =~ ^([0-9]*)(\.([0-9]*))?([eE]([-+]?)([0-9]+))?$ && -n ${BASH_REMATCH[1]}${BASH_REMATCH[3]} ]]; then
		int=${BASH_REMATCH[1]} frac=${BASH_REMATCH[3]}
		[[ -n ${BASH_REMATCH[4]} ]] && exp=$((10#${BASH_REMATCH[6]})) && [[ ${BASH_REMATCH[5]} == - ]] && exp=$((-exp))
	else
		return 0
	fi
	digits=$int$frac
	point=$((${#int} + exp + 6))
	if ((point <= 0)); then echo 0; return; fi
	while ((${#digits} < point)); do digits+=0; done
	digits=${digits:0:point}
	digits=${digits##+(0)}
	echo "$sign$((10#${digits:-0}))"
}
abs() { local x=$1; echo "${x#-}"; }
# fmt_micro N: millionths back to a decimal with 3 places.
fmt_micro() {
	local n=$1 sign=
	[[ $n == -* ]] && sign=- && n=${n#-}
	printf '%s%d.%03d' "$sign" $((n / 1000000)) $(((n % 1000000) / 1000))
}

# metric FILE NAME GPU: the value of NAME{gpu="GPU",…} in FILE, or nothing.
metric() {
	local line
	while IFS= read -r line; do
		[[ $line == "$2{"* ]] || continue
		[[ $line == *"{gpu=\"$3\""* || $line == *",gpu=\"$3\""* ]] || continue
		echo "${line##* }"
		return
	done <"$1"
}
# label LINE KEY: a label's value in one exposition line.
label() { [[ $1 =~ [{,]$2=\"([^\"]*)\" ]] && echo "${BASH_REMATCH[1]}"; }
# gpu_info FILE: "gpu|uuid|model|mig_mode|mig_profile" per tally_gpu_info line.
gpu_info() {
	local line
	while IFS= read -r line; do
		[[ $line == 'tally_gpu_info{'* ]] || continue
		echo "$(label "$line" gpu)|$(label "$line" uuid)|$(label "$line" model)|$(label "$line" mig_mode)|$(label "$line" mig_profile)"
	done <"$1"
}
# metric_sum FILE METRIC KEY PATTERN: Σ METRIC over the lines whose label
# KEY matches the (extglob) PATTERN, in millionths.
metric_sum() {
	local line sum=0 v
	while IFS= read -r line; do
		[[ $line == "$2{"* ]] || continue
		# Unquoted: PATTERN is matched as a pattern.
		[[ $(label "$line" "$3") == $4 ]] || continue
		v=$(micro "${line##* }")
		sum=$((sum + ${v:-0}))
	done <"$1"
	echo "$sum"
}
# increase METRIC KEY PATTERN: metric_sum's growth from the first scrape to
# the last.
increase() {
	echo $(($(metric_sum "$OUT/metrics-$LAST.txt" "$@") - $(metric_sum "$OUT/metrics-$FIRST.txt" "$@")))
}

# http_get PATH FILE: GET from the agent over /dev/tcp; the body into FILE.
http_get() {
	local fd status line
	# A bare `exec 2>…` would redirect the whole script: group it.
	{ exec {fd}<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null || return 1
	printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$1" >&"$fd"
	timeout 20 cat <&"$fd" >"$WORK/http.raw"
	exec {fd}>&-
	{
		IFS= read -r status
		while IFS= read -r line && [[ $line != $'\r' && -n $line ]]; do :; done
		cat >"$2"
	} <"$WORK/http.raw"
	[[ $status == *" 200 "* ]]
}

now_ns() { date +%s%N; }

# smi ARGS…: nvidia-smi with a time limit, its output on stdout.
smi() { timeout 30 "$SMI" "$@"; }
# csv_fields LINE: the fields of one `--format=csv,noheader,nounits` line,
# one per line, trimmed.
csv_fields() {
	local IFS=, f
	local -a parts
	read -ra parts <<<"$1"
	for f in "${parts[@]}"; do
		f=${f##+([[:space:]])}
		echo "${f%%+([[:space:]])}"
	done
}

echo "check.sh: tally $("$TALLY" --version 2>/dev/null), out $OUT"
[[ -z $SMI ]] && echo "check.sh: no nvidia-smi: comparisons with the driver's tool are skipped"

# ------------------------------------------------------------------ driver

SMI_COUNT= SMI_DRIVER=
if [[ -n $SMI ]]; then
	smi -L >"$OUT/nvidia-smi-L.txt" 2>&1
	if smi --query-gpu=index,driver_version --format=csv,noheader,nounits >"$WORK/drv.csv" 2>"$WORK/drv.err"; then
		SMI_COUNT=$(wc -l <"$WORK/drv.csv")
		mapfile -t f < <(csv_fields "$(head -n1 "$WORK/drv.csv")")
		SMI_DRIVER=${f[1]:-}
	else
		row "nvidia-smi answers" "" "$(cat "$WORK/drv.err")" "FAIL: nvidia-smi --query-gpu failed"
	fi
fi

# ------------------------------------------------------------------ config

CG_MOUNT=
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
	CG_MOUNT=/sys/fs/cgroup
elif [[ -f /sys/fs/cgroup/unified/cgroup.procs ]]; then
	CG_MOUNT=/sys/fs/cgroup/unified
fi
OWN_CG=/
while IFS= read -r line; do [[ $line == 0::* ]] && OWN_CG=${line#0::}; done </proc/self/cgroup
TENANT=gpucheck
CONF=$WORK/tally.toml
{
	echo "[agent]"
	echo "state_dir = \"$WORK/state\""
	echo "node = \"gpucheck\""
	[[ -n $NVML_LIB ]] && echo "nvml_lib = \"$NVML_LIB\""
	echo "[probes]"
	echo "pin_dir = \"$PIN_DIR\""
	[[ -n $CUDA_LIB ]] && echo "cuda_libs = [\"$CUDA_LIB\"]"
	echo "[[tenant.rule]]"
	# The workload's cgroup names the tenant: <own cgroup>/tally-gpucheck-PID/gpucheck.
	printf 'cgroup = %s/tally-gpucheck-%s/(?P<tenant>[^/]+)$%s\n' "'" "$$" "'"
} >"$CONF"
cp "$CONF" "$OUT/tally.toml"
"$TALLY" config check "$CONF" >/dev/null 2>"$WORK/config.err" || die "tally rejects its config: $(cat "$WORK/config.err")"

# ------------------------------------------------------------------ doctor

"$TALLY" doctor --config "$CONF" >"$OUT/doctor.txt" 2>"$OUT/doctor.log"
echo "doctor exit $?" >>"$OUT/doctor.log"
while IFS= read -r line; do
	[[ $line =~ ^\[(ok\ \ |warn|FAIL)\]\ ([^ ]+)\ +(.*)$ ]] || continue
	tag=${BASH_REMATCH[1]} name=${BASH_REMATCH[2]} text=${BASH_REMATCH[3]}
	case $tag in "ok  ") verdict=ok ;; warn) verdict="warn (not a failure)" ;; *) verdict="FAIL" ;; esac
	if [[ $name == nvml && $text =~ driver\ ([^,]+),\ ([0-9]+)\ GPU ]]; then
		if [[ -z $SMI ]]; then
			row "doctor: nvml" "$text" "" "$verdict; $NO_SMI"
		elif [[ ${BASH_REMATCH[1]} == "$SMI_DRIVER" && ${BASH_REMATCH[2]} == "$SMI_COUNT" ]]; then
			row "doctor: nvml" "$text" "driver $SMI_DRIVER, $SMI_COUNT GPU(s)" "$verdict"
		else
			row "doctor: nvml" "$text" "driver $SMI_DRIVER, $SMI_COUNT GPU(s)" "MISMATCH"
		fi
	else
		row "doctor: $name" "$text" "" "$verdict"
	fi
done <"$OUT/doctor.txt"

# ------------------------------------------------------------------ workload choice

# The workload: what holds GPU memory, run in the test tenant's cgroup.
HOLD=()
HOLD_WHY=
if [[ -n $HOLD_CMD ]]; then
	read -ra HOLD <<<"$HOLD_CMD"
elif [[ -z $SMI ]]; then
	HOLD_WHY="no nvidia-smi to compare with"
elif [[ -x $HERE/gpu-hold ]] && "$HERE/gpu-hold" --mib 1 --seconds 0 >"$WORK/probe-hold.txt" 2>&1; then
	HOLD=("$HERE/gpu-hold" --mib 1024 --seconds "$HOLD_SECONDS" --busy)
elif command -v python3 >/dev/null && timeout 60 python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
	HOLD=(python3 -c "import torch, time; x = torch.empty(1 << 30, dtype=torch.uint8, device='cuda'); time.sleep($HOLD_SECONDS)")
else
	HOLD_WHY="no program that can hold GPU memory (gpu-hold: $(head -c 200 "$WORK/probe-hold.txt" 2>/dev/null); no python3 with torch)"
fi
if ((${#HOLD[@]})) && [[ -z $CG_MOUNT ]]; then
	HOLD=() HOLD_WHY="no cgroup v2 hierarchy for the test tenant"
fi
# ------------------------------------------------------------------ agent

AGENT_LOG=$OUT/agent.log
for _ in 1 2 3 4 5; do
	PORT=$((20000 + RANDOM % 40000))
	{ (exec 3<>"/dev/tcp/127.0.0.1/$PORT"); } 2>/dev/null && continue
	TALLY_LOG=info "$TALLY" agent --config "$CONF" --listen "127.0.0.1:$PORT" --sample-interval 1s \
		</dev/null >/dev/null 2>"$AGENT_LOG" &
	AGENT_PID=$!
	break
done
[[ -n $AGENT_PID ]] || die "no free port for the agent"
ready=
for _ in $(seq 300); do
	if http_get /readyz "$WORK/readyz"; then ready=1; break; fi
	kill -0 "$AGENT_PID" 2>/dev/null || break
	sleep 0.1
done
if [[ -z $ready ]]; then
	row "agent starts" "not ready in 30 s; see agent.log" "" "FAIL"
	tail -n 20 "$AGENT_LOG" >&2
	SCRAPES=0
	finish
fi

start_hold() {
	CGROUP_TOP=$CG_MOUNT${OWN_CG%/}/tally-gpucheck-$$
	mkdir -p "$CGROUP_TOP/$TENANT" || { HOLD_WHY="cannot create $CGROUP_TOP/$TENANT"; return 1; }
	# The shell moves itself in, then execs: the workload never runs outside.
	sh -c 'echo $$ >"$0" && exec "$@"' "$CGROUP_TOP/$TENANT/cgroup.procs" "${HOLD[@]}" \
		</dev/null >"$OUT/hold.log" 2>&1 &
	HOLD_PID=$!
	HOLD_T0=$(now_ns)
	echo "check.sh: workload pid $HOLD_PID in $CGROUP_TOP/$TENANT: ${HOLD[*]}"
}

# ------------------------------------------------------------------ scrapes

SCRAPES=$((RUN_SECONDS / SCRAPE_EVERY + 1))
T0=$(now_ns)
declare -a WALL_NS HOLD_ALIVE
HOLD_STARTED=
for ((i = 0; i < SCRAPES; i++)); do
	due=$((T0 + i * SCRAPE_EVERY * 1000000000))
	now=$(now_ns)
	((due > now)) && sleep "$(((due - now) / 1000000000)).$(printf '%09d' $(((due - now) % 1000000000)))"
	n=$(printf '%02d' "$i")
	WALL_NS[i]=$(now_ns)
	HOLD_ALIVE[i]=0
	[[ -n $HOLD_PID ]] && kill -0 "$HOLD_PID" 2>/dev/null && HOLD_ALIVE[i]=1
	http_get /metrics "$OUT/metrics-$n.txt" || echo "scrape $n failed" >>"$OUT/errors.txt"
	http_get /api/v1/snapshot "$WORK/snap.json" &&
		while IFS= read -r line; do line=${line##+([[:space:]])}; printf '%s' "${line/\": /\":}"; done \
			<"$WORK/snap.json" >"$OUT/snapshot-$n.json"
	if [[ -n $SMI ]]; then
		smi --query-gpu=index,uuid,name,mig.mode.current,memory.used,memory.total,power.draw,temperature.gpu,utilization.gpu \
			--format=csv,noheader,nounits >"$OUT/smi-gpu-$n.csv" 2>&1
		smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits \
			>"$OUT/smi-apps-$n.csv" 2>&1
	fi
	if ((i == 0)) && ((${#HOLD[@]})); then start_hold && HOLD_STARTED=$i; fi
	echo "check.sh: scrape $((i + 1))/$SCRAPES"
done

# ------------------------------------------------------------------ devices

LAST=$(printf '%02d' $((SCRAPES - 1)))
FIRST=00
mapfile -t INFO < <(gpu_info "$OUT/metrics-$LAST.txt")
PHYS=()
for g in "${INFO[@]}"; do [[ ${g%%|*} != */* ]] && PHYS+=("${g%%|*}"); done
if [[ -n $SMI ]]; then
	[[ ${#PHYS[@]} == "$SMI_COUNT" ]] && v=ok || v=MISMATCH
	row "device count" "${#PHYS[@]}" "$SMI_COUNT" "$v"
	# MIG instances: their UUIDs against `nvidia-smi -L`.
	tally_mig=() smi_mig=()
	for g in "${INFO[@]}"; do [[ ${g%%|*} == */* ]] && IFS='|' read -r _ u _ <<<"$g" && tally_mig+=("$u"); done
	while IFS= read -r line; do [[ $line =~ UUID:\ (MIG-[^\)]+)\) ]] && smi_mig+=("${BASH_REMATCH[1]}"); done <"$OUT/nvidia-smi-L.txt"
	a=$(printf '%s\n' "${tally_mig[@]}" | sort | tr '\n' ' ') b=$(printf '%s\n' "${smi_mig[@]}" | sort | tr '\n' ' ')
	[[ $a == "$b" ]] && v=ok || v=MISMATCH
	row "MIG instances (UUIDs)" "${#tally_mig[@]}: ${a:-none}" "${#smi_mig[@]}: ${b:-none}" "$v"
else
	row "device count" "${#PHYS[@]}" "" "$NO_SMI"
fi

# Scrapes in transition: the workload appeared or went between this scrape
# and the one before (as nvidia-smi, else the process table, saw it), or it
# was just started. Tally's sample is up to one interval older than
# nvidia-smi's answer, so there the two may rightly differ.
declare -a TRANS
present() { # SCRAPE: 1 when the workload holds the GPU at that scrape
	local line
	[[ -z $HOLD_PID ]] && { echo 0; return; }
	if [[ -n $SMI ]]; then
		while IFS= read -r line; do [[ ${line%%,*} == "$HOLD_PID" ]] && { echo 1; return; }; done \
			<"$OUT/smi-apps-$(printf '%02d' "$1").csv"
		echo 0
	else
		echo "${HOLD_ALIVE[$1]:-0}"
	fi
}
prev=0
for ((i = 0; i < SCRAPES; i++)); do
	p=$(present "$i")
	TRANS[i]=0
	((p != prev)) && TRANS[i]=1
	[[ -n $HOLD_STARTED ]] && ((i == HOLD_STARTED + 1)) && TRANS[i]=1
	prev=$p
done

# One comparison per check and GPU across every scrape: the first scrape
# that disagrees is shown, else the last one.
declare -A CMP_BAD CMP_T CMP_S CMP_N CMP_OK
CMP_KEYS=()
declare -A CMP_TR
compare() { # KEY TALLY SMI OK(0|1) SCRAPE
	if [[ -z ${CMP_N[$1]+x} ]]; then CMP_KEYS+=("$1"); CMP_N[$1]=0; CMP_OK[$1]=0; CMP_TR[$1]=0; fi
	CMP_N[$1]=$((CMP_N[$1] + 1))
	if ! (($4)) && ((TRANS[10#$5])); then
		CMP_TR[$1]=$((CMP_TR[$1] + 1))
	elif (($4)); then
		CMP_OK[$1]=$((CMP_OK[$1] + 1))
		[[ -z ${CMP_BAD[$1]:-} ]] && CMP_T[$1]=$2 && CMP_S[$1]=$3
	elif [[ -z ${CMP_BAD[$1]:-} ]]; then
		CMP_BAD[$1]="scrape $5" CMP_T[$1]=$2 CMP_S[$1]=$3
	fi
}
na() { [[ -z $1 || $1 == "["* ]]; }
within() { # A B TOL (millionths)
	local d=$(($1 - $2))
	((${d#-} <= $3))
}
if [[ -n $SMI ]]; then
	for ((i = 0; i < SCRAPES; i++)); do
		n=$(printf '%02d' "$i")
		m=$OUT/metrics-$n.txt
		[[ -s $m ]] || continue
		declare -A TI=()
		while IFS='|' read -r g u model mig _; do TI[$g]="$u|$model|$mig"; done < <(gpu_info "$m")
		while IFS= read -r line; do
			mapfile -t f < <(csv_fields "$line")
			((${#f[@]} >= 9)) || continue
			g=${f[0]}
			IFS='|' read -r t_uuid t_model t_mig <<<"${TI[$g]:-||}"
			compare "gpu $g uuid" "$t_uuid" "${f[1]}" "$([[ $t_uuid == "${f[1]}" ]] && echo 1 || echo 0)" "$n"
			compare "gpu $g model" "$t_model" "${f[2]}" "$([[ $t_model == "${f[2]}" ]] && echo 1 || echo 0)" "$n"
			s_mig=false
			[[ ${f[3]} == Enabled ]] && s_mig=true
			compare "gpu $g MIG mode" "$t_mig" "${f[3]}" "$([[ $t_mig == "$s_mig" ]] && echo 1 || echo 0)" "$n"
			# Memory: exact, at nvidia-smi's 1 MiB resolution.
			for k in used:4 total:5; do
				t=$(metric "$m" "tally_gpu_memory_${k%:*}_bytes" "$g")
				s=${f[${k#*:}]}
				tm=$(($(micro "${t:-0}") / 1000000 / 1048576))
				ok=0
				[[ -n $t && $s =~ ^[0-9]+$ ]] && within "$tm" "$s" 1 && ok=1
				compare "gpu $g memory ${k%:*} (MiB)" "${t:+$tm}" "$s" "$ok" "$n"
			done
			# Power: within 15 % or 15 W (the agent's sample is up to 1 s old).
			t=$(metric "$m" tally_gpu_power_watts "$g")
			s=${f[6]}
			ok=0
			if na "$s" && [[ -z $t ]]; then
				ok=1
			elif [[ -n $t ]] && ! na "$s"; then
				a=$(micro "$t") b=$(micro "$s")
				tol=$((b * 15 / 100))
				((tol < 15000000)) && tol=15000000
				within "$a" "$b" "$tol" && ok=1
			fi
			compare "gpu $g power (W)" "$t" "$s" "$ok" "$n"
			# Temperature: within 3 °C.
			t=$(metric "$m" tally_gpu_temperature_celsius "$g")
			s=${f[7]}
			ok=0
			if na "$s" && [[ -z $t ]]; then ok=1; elif [[ -n $t ]] && ! na "$s"; then within "$(micro "$t")" "$(micro "$s")" 3000000 && ok=1; fi
			compare "gpu $g temperature (°C)" "$t" "$s" "$ok" "$n"
			# Utilization: within 15 points (NVML averages over its own period).
			t=$(metric "$m" tally_gpu_utilization_ratio "$g")
			s=${f[8]}
			ok=0
			tp=
			[[ -n $t ]] && tp=$(($(micro "$t") / 10000))
			if na "$s" && [[ -z $t ]]; then ok=1; elif [[ -n $t ]] && ! na "$s"; then within "$tp" "$s" 15 && ok=1; fi
			compare "gpu $g utilization (%)" "${tp:-n/a}" "$s" "$ok" "$n"
		done <"$OUT/smi-gpu-$n.csv"
		unset TI
	done
	for k in "${CMP_KEYS[@]}"; do
		if [[ -n ${CMP_BAD[$k]:-} ]]; then
			row "$k" "${CMP_T[$k]}" "${CMP_S[$k]}" "MISMATCH at ${CMP_BAD[$k]} (${CMP_OK[$k]}/${CMP_N[$k]} scrapes agree)"
		elif ((CMP_TR[$k])); then
			row "$k" "${CMP_T[$k]}" "${CMP_S[$k]}" "ok (${CMP_OK[$k]}/${CMP_N[$k]} scrapes; ${CMP_TR[$k]} differing while the workload started or stopped)"
		else
			row "$k" "${CMP_T[$k]}" "${CMP_S[$k]}" "ok (${CMP_N[$k]}/${CMP_N[$k]} scrapes)"
		fi
	done
else
	for c in "UUIDs, model, MIG mode" "memory used and total" "power, temperature" "utilization"; do
		row "$c" "in metrics-*.txt" "" "$NO_SMI"
	done
fi

# ------------------------------------------------------------------ Tally's own sums

wall=$(((WALL_NS[SCRAPES - 1] - WALL_NS[0]) / 1000))
for g in "${INFO[@]}"; do
	IFS='|' read -r gpu _ _ mig profile <<<"$g"
	# Observed seconds: wall time between the first and last scrape, give or
	# take one sampling interval at each end (2 s + 2 %).
	a=$(micro "$(metric "$OUT/metrics-$FIRST.txt" tally_gpu_observed_seconds_total "$gpu")")
	b=$(micro "$(metric "$OUT/metrics-$LAST.txt" tally_gpu_observed_seconds_total "$gpu")")
	obs=$((${b:-0} - ${a:-0}))
	tol=$((2000000 + wall / 50))
	if [[ $mig == true && $gpu != */* ]]; then
		# A MIG parent counts wall time × the slices no instance occupies.
		((obs <= wall + tol)) && v=ok || v=MISMATCH
		row "gpu $gpu observed s (MIG parent: unoccupied share)" "$(fmt_micro "$obs")" "wall $(fmt_micro "$wall")" "$v"
	else
		within "$obs" "$wall" "$tol" && v=ok || v=MISMATCH
		row "gpu $gpu observed s = wall time" "$(fmt_micro "$obs")" "wall $(fmt_micro "$wall")" "$v"
	fi
	[[ $gpu == */* ]] && continue
	# Energy: NVML's counter never goes back, and the tenants' shares (over
	# the GPU and its MIG instances) add up to its increase.
	prev= mono=ok
	for ((i = 0; i < SCRAPES; i++)); do
		e=$(micro "$(metric "$OUT/metrics-$(printf '%02d' "$i").txt" tally_gpu_energy_joules_total "$gpu")")
		[[ -z $e ]] && { mono="no counter at scrape $i"; break; }
		[[ -n $prev ]] && ((e < prev)) && mono="MISMATCH: went back at scrape $i"
		prev=$e
	done
	a=$(micro "$(metric "$OUT/metrics-$FIRST.txt" tally_gpu_energy_joules_total "$gpu")")
	b=$(micro "$(metric "$OUT/metrics-$LAST.txt" tally_gpu_energy_joules_total "$gpu")")
	if [[ -z $a || -z $b ]]; then
		row "gpu $gpu energy counter" "no tally_gpu_energy_joules_total" "" "skipped (the GPU reports no energy counter)"
		continue
	fi
	dev=$((b - a))
	row "gpu $gpu energy counter monotonic" "$(fmt_micro "$a") → $(fmt_micro "$b") J" "" "$mono"
	# The tenants' energy on the GPU and on its MIG instances.
	ten=$(increase tally_tenant_gpu_energy_joules_total gpu "@($gpu|$gpu/*)")
	tol=$(($(abs "$dev") / 1000000 + 100))
	within "$ten" "$dev" "$tol" && v=ok || v=MISMATCH
	row "gpu $gpu Σ tenants' energy = counter increase" "tenants $(fmt_micro "$ten") J" "counter +$(fmt_micro "$dev") J" "$v"
done

# ------------------------------------------------------------------ workload

# snap_procs FILE PID: "gpu|uuid|parent_uuid|tenant|memory_bytes" for each
# device whose process list in the snapshot holds PID.
snap_procs() {
	local json rest chunk gpu uuid parent
	json=$(<"$1")
	rest=$json
	while [[ $rest == *'{"gpu":"'* ]]; do
		rest=${rest#*'{"gpu":"'}
		chunk=${rest%%'{"gpu":"'*}
		gpu=${chunk%%\"*}
		uuid= parent=
		[[ $chunk =~ \"uuid\":\"([^\"]*)\" ]] && uuid=${BASH_REMATCH[1]}
		[[ $chunk =~ \"parent_uuid\":\"([^\"]*)\" ]] && parent=${BASH_REMATCH[1]}
		if [[ $chunk =~ \{\"pid\":$2,\"tenant\":\"([^\"]*)\"[^}]*\"memory_bytes\":([0-9]+) ]]; then
			echo "$gpu|$uuid|$parent|${BASH_REMATCH[1]}|${BASH_REMATCH[2]}"
		fi
	done
}
if [[ -z $HOLD_STARTED ]]; then
	row "workload: pid, memory, tenant" "" "" "skipped (${HOLD_WHY:-the workload did not start})"
else
	seen=0 good=0 tolerated=0 first_bad= tally_txt= smi_txt=
	for ((i = 1; i < SCRAPES; i++)); do
		n=$(printf '%02d' "$i")
		[[ -s $OUT/snapshot-$n.json ]] || continue
		mapfile -t tp < <(snap_procs "$OUT/snapshot-$n.json" "$HOLD_PID")
		t_line=${tp[0]:-}
		IFS='|' read -r t_gpu t_uuid t_parent t_tenant t_mem <<<"$t_line"
		if [[ -n $SMI ]]; then
			s_line=
			while IFS= read -r line; do
				mapfile -t f < <(csv_fields "$line")
				[[ ${f[0]:-} == "$HOLD_PID" ]] && s_line="${f[1]}|${f[2]}"
			done <"$OUT/smi-apps-$n.csv"
			[[ -z $s_line && -z $t_line ]] && continue
			seen=$((seen + 1))
			IFS='|' read -r s_uuid s_mem <<<"$s_line"
			ok=1
			[[ -n $s_line && -n $t_line && $t_tenant == "$TENANT" ]] || ok=0
			[[ $s_uuid == "$t_uuid" || $s_uuid == "$t_parent" ]] || ok=0
			if [[ $s_mem =~ ^[0-9]+$ ]]; then within $((${t_mem:-0} / 1048576)) "$s_mem" 1 || ok=0; fi
			txt_t="pid $HOLD_PID: ${t_line:+gpu $t_gpu, tenant $t_tenant, $((t_mem / 1048576)) MiB}"
			txt_s="pid $HOLD_PID: ${s_line:+$s_uuid, $s_mem MiB}"
		else
			# The reference is the process itself: alive when scraped.
			((HOLD_ALIVE[i])) || [[ -n $t_line ]] || continue
			seen=$((seen + 1))
			ok=0
			[[ -n $t_line && $t_tenant == "$TENANT" ]] && ok=1
			txt_t="pid $HOLD_PID: ${t_line:+gpu $t_gpu, tenant $t_tenant, $((t_mem / 1048576)) MiB}"
			txt_s=
		fi
		if ((ok)); then
			good=$((good + 1))
			[[ -z $first_bad ]] && tally_txt=$txt_t smi_txt=$txt_s
		elif ((TRANS[i])); then
			tolerated=$((tolerated + 1))
		elif [[ -z $first_bad ]]; then
			first_bad=$n tally_txt=$txt_t smi_txt=$txt_s
		fi
	done
	if ((seen == 0)); then
		v="FAIL: the workload never held GPU memory (hold.log: $(head -c 300 "$OUT/hold.log"))"
	elif ((good == 0)); then
		v="MISMATCH (no scrape agrees; $seen with the workload)"
	elif [[ -n $first_bad ]]; then
		v="MISMATCH at scrape $first_bad ($good/$seen scrapes agree)"
	else
		v="ok ($good/$seen scrapes)"
		((tolerated)) && v="ok ($good/$seen scrapes; $tolerated differing while it started or stopped)"
	fi
	[[ -z $SMI ]] && v="$v; tenant and pid only, nvidia-smi side $NO_SMI"
	row "workload: pid, memory, tenant $TENANT" "$tally_txt" "$smi_txt" "$v"
	# PCIe copies the workload made (gpu-hold says how many bytes), as the
	# uprobes on libcuda counted them.
	copied=
	while IFS= read -r line; do [[ $line =~ ^gpu-hold:.*copied\ ([0-9]+)\ bytes ]] && copied=${BASH_REMATCH[1]}; done <"$OUT/hold.log"
	if [[ -n $copied ]]; then
		p=0
		while IFS= read -r line; do
			[[ $line == 'tally_tenant_pcie_bytes_total{'* && $(label "$line" tenant) == "$TENANT" && $(label "$line" direction) == h2d ]] &&
				p=$(($(micro "${line##* }") / 1000000))
		done <"$OUT/metrics-$LAST.txt"
		((p >= copied)) && v=ok || v=MISMATCH
		row "workload: PCIe h2d bytes of tenant $TENANT (uprobes)" "$p" "gpu-hold copied $copied" "$v"
	fi
	# GPU time charged to the tenant over the run, the workload being the
	# GPU's only holder. Held time against the workload's lifetime on the
	# script's clock: at least from its start to the last scrape that saw
	# it alive, less one sampling interval (and on a real driver 3 s more:
	# CUDA's start-up, before it holds the GPU); at most to the first
	# scrape that found it gone, plus one sampling interval.
	held=$(increase tally_tenant_gpu_allocated_seconds_total tenant "$TENANT")
	alive_to= gone_at=
	for ((i = 1; i < SCRAPES; i++)); do
		if ((HOLD_ALIVE[i])); then alive_to=${WALL_NS[i]}; elif [[ -z $gone_at ]]; then gone_at=${WALL_NS[i]}; fi
	done
	slack=1000000
	[[ -n $SMI ]] && slack=4000000
	alive_lo=$(((${alive_to:-$HOLD_T0} - HOLD_T0) / 1000))
	alive_hi=$(((${gone_at:-${WALL_NS[SCRAPES - 1]}} - HOLD_T0) / 1000))
	lo=$((alive_lo - slack))
	((lo < 0)) && lo=0
	((held >= lo && held <= alive_hi + 1000000)) && v=ok || v=MISMATCH
	row "workload: held GPU time of tenant $TENANT (its only holder)" "$(fmt_micro "$held") s allocated" \
		"alive $(fmt_micro "$alive_lo") to $(fmt_micro "$alive_hi") s (the script's clock)" "$v"
	# SM work against nvidia-smi's utilization integrated over the scrapes
	# (trapezoids): gpu-hold --busy keeps the SMs busy for --hold-seconds.
	sm=$(increase tally_tenant_gpu_sm_seconds_total tenant "$TENANT")
	busy=
	while IFS= read -r line; do [[ $line =~ ^gpu-hold:\ (busy\ .*|no\ kernel.*) ]] && busy=${BASH_REMATCH[1]}; done <"$OUT/hold.log"
	if [[ -n $SMI ]]; then
		# The workload's GPU, by the UUID nvidia-smi listed it on.
		w_uuid=
		for ((i = 0; i < SCRAPES; i++)); do
			while IFS= read -r line; do
				mapfile -t f < <(csv_fields "$line")
				[[ ${f[0]:-} == "$HOLD_PID" ]] && w_uuid=${f[1]}
			done <"$OUT/smi-apps-$(printf '%02d' "$i").csv"
		done
		integral=0 prev_u= prev_t= u_max=0
		for ((i = 0; i < SCRAPES; i++)); do
			u=
			while IFS= read -r line; do
				mapfile -t f < <(csv_fields "$line")
				[[ -n $w_uuid && ${f[1]:-} == "$w_uuid" && ${f[8]:-} =~ ^[0-9]+$ ]] && u=${f[8]}
			done <"$OUT/smi-gpu-$(printf '%02d' "$i").csv"
			[[ -z $u ]] && { prev_u=; continue; }
			((u > u_max)) && u_max=$u
			[[ -n $prev_u ]] && integral=$((integral + (prev_u + u) * (WALL_NS[i] - prev_t) / 200000))
			prev_u=$u prev_t=${WALL_NS[i]}
		done
		# integral is in millionths of a second: % × ns / 2 / 100 / 1000.
		# Trapezoids miss at most half a scrape interval at the workload's
		# start and at its end, and Tally's samples lag by up to one
		# sampling interval (1 s): so much at the highest utilization, and
		# 20 % for the two ways of averaging.
		tol=$((integral / 5 + u_max * (SCRAPE_EVERY + 1) * 10000))
		within "$sm" "$integral" "$tol" && v=ok || v=MISMATCH
		row "workload: SM seconds of tenant $TENANT" "$(fmt_micro "$sm") s" \
			"∫ utilization.gpu $(fmt_micro "$integral") s${busy:+ (gpu-hold: $busy)}" "$v"
	else
		row "workload: SM seconds of tenant $TENANT" "$(fmt_micro "$sm") s" "${busy:+gpu-hold: $busy}" "$NO_SMI"
	fi
fi

# ------------------------------------------------------------------ cuMemcpy*

SYMBOLS=(cuMemcpyHtoD cuMemcpyHtoD_v2 cuMemcpyHtoD_v2_ptds cuMemcpyHtoDAsync cuMemcpyHtoDAsync_v2
	cuMemcpyHtoDAsync_v2_ptsz cuMemcpyDtoH cuMemcpyDtoH_v2 cuMemcpyDtoH_v2_ptds cuMemcpyDtoHAsync
	cuMemcpyDtoHAsync_v2 cuMemcpyDtoHAsync_v2_ptsz cuMemcpy cuMemcpy_ptds cuMemcpyAsync
	cuMemcpyAsync_ptsz cuMemcpy2D_v2 cuMemcpy2D_v2_ptds cuMemcpy2DUnaligned_v2
	cuMemcpy2DUnaligned_v2_ptds cuMemcpy2DAsync_v2 cuMemcpy2DAsync_v2_ptsz)

# u FILE OFFSET BYTES: an unsigned little-endian number read from FILE.
u() { local v; read -r v < <(od -An -v -j "$2" -N "$3" -t "u$3" "$1"); echo "${v:-0}"; }
# elf_exports LIB NAME…: the NAMEs LIB's dynamic symbol table defines
# (what a uprobe by name can attach to), read with od alone.
elf_exports() {
	local lib=$1
	shift
	[[ $(od -An -N6 -t x1 "$lib" | tr -d ' \n') == 7f454c460201 ]] || { echo "not a 64-bit little-endian ELF" >&2; return 1; }
	local shoff shentsize shnum
	shoff=$(u "$lib" 40 8) shentsize=$(u "$lib" 58 2) shnum=$(u "$lib" 60 2)
	local -a sh
	local i sym_off= sym_size= link= str_off str_size
	mapfile -t sh < <(od -An -v -j "$shoff" -N $((shnum * shentsize)) -t u4 -w"$shentsize" "$lib")
	for ((i = 0; i < shnum; i++)); do
		read -ra w <<<"${sh[i]}"
		if ((w[1] == 11)); then # SHT_DYNSYM
			sym_off=$((w[6] + (w[7] << 32))) sym_size=$((w[8] + (w[9] << 32))) link=${w[10]}
		fi
	done
	[[ -n $sym_off ]] || { echo "no .dynsym" >&2; return 1; }
	read -ra w <<<"${sh[link]}"
	str_off=$((w[6] + (w[7] << 32))) str_size=$((w[8] + (w[9] << 32)))
	# Offsets in .dynstr at which each wanted name starts (a name may be the
	# tail of a longer string).
	local -A at=()
	local s pos=0 name
	while IFS= read -r s; do
		if [[ $s == *cuMemcpy* ]]; then
			for name in "$@"; do [[ $s == *"$name" ]] && at[$((pos + ${#s} - ${#name}))]=$name; done
		fi
		pos=$((pos + ${#s} + 1))
	done < <(tail -c +$((str_off + 1)) "$lib" | head -c "$str_size" | tr '\0' '\n')
	local -A defined=()
	while read -ra w; do
		# st_name, then st_info | st_other << 8 | st_shndx << 16: defined
		# symbols have a section index.
		[[ -n ${at[${w[0]}]:-} ]] && ((w[1] >> 16 != 0)) && defined[${at[${w[0]}]}]=1
	done < <(od -An -v -j "$sym_off" -N "$sym_size" -t u4 -w24 "$lib")
	for name in "$@"; do [[ -n ${defined[$name]:-} ]] && echo "$name"; done
	return 0
}

# The libraries: the one given, else those the agent probed, else the usual places.
LIBS=()
[[ -n $CUDA_LIB ]] && LIBS+=("$CUDA_LIB")
declare -A ATTACHED=()
while IFS= read -r line; do
	[[ $line == *"uprobes attached"* && $line =~ library=([^ ]+) ]] || continue
	lib=${BASH_REMATCH[1]}
	[[ $line =~ entry_points=([0-9]+) ]] && ATTACHED[$lib]=${BASH_REMATCH[1]}
	[[ " ${LIBS[*]} " == *" $lib "* ]] || LIBS+=("$lib")
done <"$AGENT_LOG"
if ((${#LIBS[@]} == 0)); then
	for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/nvidia/lib64; do
		[[ -e $d/libcuda.so.1 ]] && LIBS+=("$d/libcuda.so.1") && break
	done
fi
if ((${#LIBS[@]} == 0)); then
	row "cuMemcpy* exported by libcuda.so.1" "" "" "skipped (no libcuda.so.1 on this machine)"
fi
for lib in "${LIBS[@]}"; do
	real=$(readlink -f "$lib")
	if ! elf_exports "$real" "${SYMBOLS[@]}" >"$WORK/symbols" 2>"$WORK/elf.err"; then
		row "cuMemcpy* in $lib" "" "" "FAIL: cannot read its symbols: $(cat "$WORK/elf.err")"
		continue
	fi
	mapfile -t found <"$WORK/symbols"
	missing=()
	for s in "${SYMBOLS[@]}"; do [[ " ${found[*]} " == *" $s "* ]] || missing+=("$s"); done
	printf '%s\n' "${found[@]}" >"$OUT/cuda-symbols.txt"
	att=${ATTACHED[$lib]:-}
	if [[ -z $att ]]; then
		v="skipped (the agent attached no uprobe to it; see agent.log)"
	elif ((att == ${#found[@]})); then
		v=ok
	else
		v=MISMATCH
	fi
	row "cuMemcpy* in $real: exported ${#found[@]} of ${#SYMBOLS[@]} = uprobes attached" \
		"${att:-0} attached" "exported: ${found[*]:-none}; absent: ${missing[*]:-none}" "$v"
done

# ------------------------------------------------------------------ GPM

# Tally reads GPM only for MIG instances' SM activity (their
# tally_gpu_utilization_ratio): say how many instances have one, next to
# what the driver says of GPM. Not compared: dmon's wording varies.
mig_total=0 mig_gpm=0
for g in "${INFO[@]}"; do
	[[ ${g%%|*} == */* ]] || continue
	mig_total=$((mig_total + 1))
	[[ -n $(metric "$OUT/metrics-$LAST.txt" tally_gpu_utilization_ratio "${g%%|*}") ]] && mig_gpm=$((mig_gpm + 1))
done
gpm_tally="MIG instances with SM activity from GPM: $mig_gpm of $mig_total"
((mig_total == 0)) && gpm_tally="no MIG instance (Tally reads GPM only for MIG instances)"
if [[ -n $SMI ]]; then
	timeout 20 "$SMI" dmon --gpm-metrics 1 -c 1 >"$OUT/gpm.txt" 2>&1
	rc=$?
	gpm="dmon --gpm-metrics exit $rc:"
	while IFS= read -r line; do [[ $line == "#"* ]] || gpm+=" $line"; done < <(head -n 4 "$OUT/gpm.txt")
	row "GPM support" "$gpm_tally" "$gpm" "info (not compared)"
else
	row "GPM support" "$gpm_tally" "" "$NO_SMI"
fi

finish
