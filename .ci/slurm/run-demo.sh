#!/usr/bin/env bash
# The demo cohort through a real one-node SLURM cluster, with the users' profile (profiles/slurm) unchanged but for
# the partition and account names (NNQC_SLURM_CPU_PARTITION / NNQC_SLURM_GPU_PARTITION / NNQC_SLURM_ACCOUNT, read
# by the profile). Starts the cluster (.ci/slurm/cluster.sh), runs, checks (.ci/slurm/check_run.py: every job went
# through sbatch, GPU rules on the gpu partition with an A100, expected outputs, complete report), and stops the
# daemons it started, on failure too. Results go to results/slurm-ci/ (NNQC_SLURM_RESULTS), apart from local runs.
#
#   .ci/slurm/run-demo.sh            (root, Debian 12; about 11 minutes on 2 cores, see the printed times)
#   NNQC_SLURM_KEEP=1 .ci/slurm/run-demo.sh     leave the cluster running afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=.ci/slurm
RESULTS=${NNQC_SLURM_RESULTS:-results/slurm-ci}
export NNQC_SLURM_CPU_PARTITION=${NNQC_SLURM_CPU_PARTITION:-cpu}
export NNQC_SLURM_GPU_PARTITION=${NNQC_SLURM_GPU_PARTITION:-gpu}
export NNQC_SLURM_ACCOUNT=${NNQC_SLURM_ACCOUNT:-nnqc-ci}
# The CI cluster keeps finished jobs visible to squeue for 2 h, so the checks can list every job of the run.
export NNQC_SLURM_MIN_JOB_AGE=${NNQC_SLURM_MIN_JOB_AGE:-7200}
STATE=${NNQC_SLURM_STATE:-/tmp/nnqc-slurm}
# Size of the synthetic demo cohort for this run: 8 keeps CI within its time (2 test subjects x 6 sources go through
# inference); "config" uses config/config.yaml's demo.n_subjects (24).
DEMO_SUBJECTS=${NNQC_SLURM_DEMO_SUBJECTS:-8}

log() { printf '[run-demo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ ! -x .venv/bin/snakemake ]; then
  log "no .venv: creating it (make env)"
  make env
fi
export PATH="$PWD/.venv/bin:$PATH"

T0=$SECONDS
SMK_LOG=""
RC=1
finish() {
  local rc=$?
  if [ "$RC" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=1; fi
  if [ "$rc" -ne 0 ]; then
    log "FAILED (rc $rc): diagnostics follow"
    [ -n "$SMK_LOG" ] && [ -f "$SMK_LOG" ] && { echo "--- last lines of $SMK_LOG"; tail -n 60 "$SMK_LOG"; }
    echo "--- squeue"; squeue --states=all -o '%i %j %T %P %k' 2>/dev/null | tail -n 30 || true
    echo "--- failed SLURM job logs"; find .snakemake/slurm_logs -name '*.log' -newer "$STATE/started" 2>/dev/null |
      head -n 3 | while read -r f; do echo "== $f"; tail -n 30 "$f"; done || true
    echo "--- daemon logs"; "$HERE/cluster.sh" logs 20 || true
  fi
  if [ "${NNQC_SLURM_KEEP:-0}" = 1 ]; then
    log "NNQC_SLURM_KEEP=1: cluster left running (stop: $HERE/cluster.sh stop)"
  else
    local t=$SECONDS
    "$HERE/cluster.sh" stop || log "cluster stop failed"
    log "cluster stop: $((SECONDS - t)) s"
  fi
  log "total: $((SECONDS - T0)) s, rc $rc"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

t=$SECONDS
"$HERE/cluster.sh" start
"$HERE/cluster.sh" selftest
T_START=$((SECONDS - t))
log "cluster start + selftest: ${T_START} s"

# The demo config with its outputs (and the demo images it generates) under $RESULTS.
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
CONFIG="$RESULTS/demo-slurm.yaml"
python - "$RESULTS" "$CONFIG" "$DEMO_SUBJECTS" <<'EOF'
import sys
import yaml

results, out, n_subjects = sys.argv[1:4]
cfg = yaml.safe_load(open("config/config.yaml"))
if n_subjects != "config":
    cfg.setdefault("demo", {})["n_subjects"] = int(n_subjects)
old = cfg.get("results", "results")
for key in ("images", "labels"):
    if isinstance(cfg.get(key), str) and cfg[key].startswith(old + "/"):
        cfg[key] = results + cfg[key][len(old):]
cfg["results"] = results
# The fake A100s have no CUDA: a GPU job with device auto or cuda would fail at once (resolve_device); cpu runs.
cfg["device"] = "cpu"
yaml.safe_dump(cfg, open(out, "w"), sort_keys=False)
EOF
COHORT=$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["cohort"])' "$CONFIG")

SMK_LOG="$RESULTS/snakemake-slurm.log"
log "snakemake --profile profiles/slurm --configfile $CONFIG (demo subjects: $DEMO_SUBJECTS; partitions $NNQC_SLURM_CPU_PARTITION/$NNQC_SLURM_GPU_PARTITION, account $NNQC_SLURM_ACCOUNT); log: $SMK_LOG"
t=$SECONDS
set +e
snakemake --profile profiles/slurm --configfile "$CONFIG" >"$SMK_LOG" 2>&1
SMK_RC=$?
set -e
T_RUN=$((SECONDS - t))
log "snakemake: rc $SMK_RC in ${T_RUN} s"
[ $SMK_RC -eq 0 ] || { RC=$SMK_RC; exit "$SMK_RC"; }

python "$HERE/check_run.py" "$SMK_LOG" "$RESULTS/$COHORT" "$HERE/expected-outputs.txt" "$CONFIG"
RC=0
log "demo through SLURM: cluster start ${T_START} s, workflow ${T_RUN} s"
