#!/usr/bin/env bash
# A one-node SLURM cluster (munge + slurmctld + slurmd from Debian's packages) for CI and local testing.
#
#   .ci/slurm/cluster.sh start      install the packages if missing, write the configs, start the daemons,
#                                   wait until the node is idle (idempotent: a running cluster of ours is kept)
#   .ci/slurm/cluster.sh selftest   srun, and an sbatch job asking for one (fake) A100
#   .ci/slurm/cluster.sh status     daemons, node and partitions
#   .ci/slurm/cluster.sh stop       cancel the jobs, stop only the daemons this script started, restore configs
#   .ci/slurm/cluster.sh logs       tail the daemons' logs
#
# Needs root on Debian 12 (bookworm, SLURM 22.05), works without systemd. Measured facts behind every choice:
# ../shared/notes/local-slurm.md. The node advertises the shape of a slice of an A100 node (NNQC_SLURM_CPUS CPUs,
# NNQC_SLURM_MEM_MB MB, NNQC_SLURM_GPUS fake a100 GPUs) whatever the machine has (SlurmdParameters=config_overrides),
# so the users' profile, with its real A100-sized requests, is scheduled unchanged. Hence TaskPlugin=task/none: with
# task/affinity a job asking for every CPU of the (inflated) node fails ("Unable to layout tasks on given cpus");
# the price is a harmless "lacks support for cpu binding" line in each job's log. The fake GPUs are character
# devices (/dev/null's numbers): jobs get CUDA_VISIBLE_DEVICES but no CUDA device, and run on the CPU (the demo
# config says device: cpu; with auto or cuda a GPU job fails at once, see nnqc_pipe.config.job_device).
#
# Environment: NNQC_SLURM_STATE (default /tmp/nnqc-slurm: spool, state, logs, pid files, record of what was
# started), NNQC_SLURM_CPUS (32), NNQC_SLURM_MEM_MB (256000), NNQC_SLURM_GPUS (2),
# NNQC_SLURM_MIN_JOB_AGE (600 s: how long finished jobs stay visible to squeue; the plugin's squeue status mode
# needs >= 3 x slurm-init-seconds-before-status-checks).
set -euo pipefail

STATE=${NNQC_SLURM_STATE:-/tmp/nnqc-slurm}
NODE_CPUS=${NNQC_SLURM_CPUS:-32}
NODE_MEM_MB=${NNQC_SLURM_MEM_MB:-256000}
NODE_GPUS=${NNQC_SLURM_GPUS:-2}
MIN_JOB_AGE=${NNQC_SLURM_MIN_JOB_AGE:-600}
HOST=$(hostname -s)
CONF_DIR=/etc/slurm
MARK="# written by nnqc-pipe .ci/slurm/cluster.sh"
RECORD="$STATE/started"      # one line per thing this script started or wrote: 'daemon NAME PIDFILE' / 'file PATH'
PACKAGES=(munge slurmctld slurmd slurm-client)

log() { printf '[slurm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes $CONF_DIR, starts daemons)"; }

recorded() { [ -f "$RECORD" ] && grep -qxF "$1" "$RECORD"; }
record() { recorded "$1" || echo "$1" >>"$RECORD"; }

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of_file() { [ -f "$1" ] && tr -d ' \n' <"$1" || true; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "packages present: ${PACKAGES[*]}"
    return
  fi
  log "installing ${missing[*]} (apt-get, daemons kept from starting by a temporary policy-rc.d)"
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    log "apt-get install failed (rc $rc), refreshing the package lists and retrying"
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
      >>"$STATE/apt.log" 2>&1 || rc=$?
    [ $rc -eq 0 ] || true
  fi
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  for p in "${missing[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
      { tail -n 30 "$STATE/apt.log" >&2; die "package $p could not be installed (see $STATE/apt.log)"; }
  done
  log "installed: ${missing[*]}"
}

# Write a config file; a pre-existing file that is not ours is moved aside and restored by 'stop'.
write_conf() {
  local path=$1 mode=$2 content=$3
  if [ -e "$path" ] && ! head -n 1 "$path" | grep -qxF "$MARK"; then
    [ -e "$STATE/backup/$(basename "$path")" ] || { mkdir -p "$STATE/backup"; cp -p "$path" "$STATE/backup/"; }
    record "restore $path"
  fi
  mkdir -p "$(dirname "$path")"
  printf '%s\n%s\n' "$MARK" "$content" >"$path"
  chmod "$mode" "$path"
  record "file $path"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if recorded "daemon munged /run/munge/munged.pid"; then
      log "munged (started earlier by this script) answers"
    else
      log "munged already answers (not started by this script: left alone)"
    fi
    return
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    record "file /etc/munge/munge.key"
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  record "daemon munged /run/munge/munged.pid"
  local i
  for i in $(seq 1 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && { log "munge works"; return; }
    sleep 0.1
  done
  die "munged does not answer (munge -n | unmunge)"
}

make_fake_gpus() {
  local i
  mkdir -p "$STATE/gpu"
  for i in $(seq 0 $((NODE_GPUS - 1))); do
    [ -c "$STATE/gpu/fakegpu$i" ] || mknod -m 666 "$STATE/gpu/fakegpu$i" c 1 3
  done
}

render_slurm_conf() {
  local gres_node="" gres_types=""
  if [ "$NODE_GPUS" -gt 0 ]; then
    gres_node="Gres=gpu:a100:$NODE_GPUS"
    gres_types="GresTypes=gpu"
  fi
  cat <<CONF
ClusterName=nnqc-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=$MIN_JOB_AGE
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$gres_types
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=$NODE_MEM_MB $gres_node State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
CONF
}

render_gres_conf() {
  [ "$NODE_GPUS" -gt 0 ] && echo "NodeName=$HOST Name=gpu Type=a100 File=$STATE/gpu/fakegpu[0-$((NODE_GPUS - 1))]"
  return 0
}

# True when the config files on disk are the ones this invocation would write.
configs_current() {
  [ -f "$CONF_DIR/slurm.conf" ] || return 1
  [ "$(cat "$CONF_DIR/slurm.conf")" = "$(printf '%s\n%s' "$MARK" "$(render_slurm_conf)")" ] || return 1
  if [ "$NODE_GPUS" -gt 0 ]; then
    [ "$(cat "$CONF_DIR/gres.conf" 2>/dev/null)" = "$(printf '%s\n%s' "$MARK" "$(render_gres_conf)")" ] || return 1
  fi
}

write_configs() {
  local d
  for d in ctld spool log run; do mkdir -p "$STATE/$d"; done
  [ "$NODE_GPUS" -gt 0 ] && make_fake_gpus
  write_conf "$CONF_DIR/slurm.conf" 0644 "$(render_slurm_conf)"
  if [ "$NODE_GPUS" -gt 0 ]; then
    write_conf "$CONF_DIR/gres.conf" 0644 "$(render_gres_conf)"
  fi
}

# Fail when a SLURM daemon that is not ours runs: it would own the ports (6817/6818) and the configs.
check_foreign() {
  local name pidfile ours p
  for name in slurmctld slurmd; do
    pidfile="$STATE/run/$name.pid"
    ours=$(pid_of_file "$pidfile")
    for p in $(pgrep -x "$name" || true); do
      [ "$p" = "$ours" ] || die "a $name (pid $p) not started by this script is running; stop it first"
    done
  done
}

start_daemon() {
  local name=$1; shift
  local pidfile="$STATE/run/$name.pid"
  if pid_alive "$(pid_of_file "$pidfile")"; then
    log "$name already running (pid $(pid_of_file "$pidfile"))"
    return
  fi
  log "starting $name"
  "$@" || die "$name failed to start; log: $STATE/log/$name.log"
  local i
  for i in $(seq 1 50); do
    pid_alive "$(pid_of_file "$pidfile")" && break
    sleep 0.1
  done
  pid_alive "$(pid_of_file "$pidfile")" || { tail -n 20 "$STATE/log/$name.log" >&2 || true; die "$name did not stay up"; }
  record "daemon $name $pidfile"
  log "$name running (pid $(pid_of_file "$pidfile"))"
}

wait_idle() {
  local i state=""
  for i in $(seq 1 60); do
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
      idle | mixed | allocated) log "node $HOST is $state"; return ;;
      drain* | down* | inval* | fail*)
        scontrol show node "$HOST" >&2 || true
        die "node $HOST is $state" ;;
    esac
    sleep 0.5
  done
  scontrol show node "$HOST" >&2 || true
  tail -n 20 "$STATE/log/slurmd.log" "$STATE/log/slurmctld.log" >&2 || true
  die "node $HOST not idle after 30 s (state: '${state:-none}')"
}

cmd_start() {
  need_root
  local t0=$SECONDS
  mkdir -p "$STATE"
  check_foreign
  if pid_alive "$(pid_of_file "$STATE/run/slurmctld.pid")" && pid_alive "$(pid_of_file "$STATE/run/slurmd.pid")"; then
    if configs_current; then
      log "cluster already running with this configuration (state in $STATE)"
      wait_idle
      return
    fi
    log "cluster running with another configuration: restarting slurmctld and slurmd"
    stop_pidfile slurmd "$STATE/run/slurmd.pid"
    stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
  fi
  install_packages
  start_munge
  write_configs
  start_daemon slurmctld slurmctld
  start_daemon slurmd slurmd -N "$HOST"
  wait_idle
  sinfo -o '%P %a %D %c %m %G %T' >&2
  log "cluster up in $((SECONDS - t0)) s (state, logs: $STATE)"
}

stop_pidfile() {
  local name=$1 pidfile=$2 pid i
  pid=$(pid_of_file "$pidfile")
  if ! pid_alive "$pid"; then
    log "$name not running"
    return
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    pid_alive "$pid" || { log "$name stopped"; return; }
    sleep 0.1
  done
  log "$name still alive after 10 s, sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
  need_root
  local t0=$SECONDS
  if [ ! -f "$RECORD" ]; then
    log "nothing recorded in $RECORD: nothing to stop"
    return
  fi
  if pid_alive "$(pid_of_file "$STATE/run/slurmctld.pid")" && recorded "daemon slurmctld $STATE/run/slurmctld.pid"; then
    # every job of this cluster is ours: cancel them so no slurmstepd outlives slurmd
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      log "cancelling the remaining jobs: $(squeue -h -o %i | tr '\n' ' ')"
      scancel --full $(squeue -h -o %i) 2>/dev/null || true
      local i
      for i in $(seq 1 30); do
        [ -z "$(squeue -h -t PD,R,CG,CF -o %i 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  local kind name pidfile
  # stop in reverse order of start: slurmd, slurmctld, munged
  for name in slurmd slurmctld munged; do
    while read -r kind n pidfile; do
      [ "$kind" = daemon ] && [ "$n" = "$name" ] && stop_pidfile "$name" "$pidfile"
    done <"$RECORD"
  done
  local path
  while read -r kind path; do
    case "$kind" in
      file) rm -f "$path" ;;
    esac
  done <"$RECORD"
  while read -r kind path; do
    case "$kind" in
      restore) cp -p "$STATE/backup/$(basename "$path")" "$path" && log "restored $path" ;;
    esac
  done <"$RECORD"
  rm -f "$RECORD"
  rm -rf "$STATE/backup" "$STATE/ctld" "$STATE/spool" "$STATE/run" "$STATE/gpu"
  log "stopped in $((SECONDS - t0)) s (logs kept in $STATE/log)"
}

cmd_status() {
  local name pid
  for name in slurmctld slurmd; do
    pid=$(pid_of_file "$STATE/run/$name.pid")
    if pid_alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
  done
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then echo "munge: working"; else echo "munge: not working"; fi
  command -v sinfo >/dev/null && sinfo -o '%P %a %D %c %m %G %T' 2>&1 || true
}

cmd_selftest() {
  local t0=$SECONDS
  log "srun true"
  timeout 60 srun -p cpu -N1 -n1 true || die "srun failed"
  log "sbatch --gpus=a100:1 (gpu partition)"
  local out
  out=$(mktemp)
  timeout 60 sbatch --wait -p gpu --gpus=a100:1 -o "$out" --wrap 'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"' >&2 ||
    die "sbatch --gpus=a100:1 failed"
  cat "$out" >&2
  grep -q '^CUDA_VISIBLE_DEVICES=0' "$out" || die "the GPU job did not see CUDA_VISIBLE_DEVICES=0"
  rm -f "$out"
  log "selftest passed in $((SECONDS - t0)) s"
}

cmd_logs() {
  tail -n "${2:-40}" "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" 2>/dev/null || true
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  selftest) cmd_selftest ;;
  logs) cmd_logs "$@" ;;
  *) echo "usage: $0 start|selftest|status|stop|logs" >&2; exit 2 ;;
esac
