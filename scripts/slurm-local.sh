#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm deployment test (docs/deployment.md).
#
#   scripts/slurm-local.sh up     # installs slurm-wlm + munge (apt) if absent, starts the daemons
#   scripts/slurm-local.sh status # exit 0 when the node is up and takes jobs
#   scripts/slurm-local.sh down   # stops the daemons this script started, removes its state
#
# Needs root (Debian bookworm, apt). The node is this machine under its own hostname, with
# GEOMX_SLURM_CPUS (default 16) CPUs whatever the hardware has (slurmd's config_overrides) and
# oversubscription allowed, so the test's tasks fit on a 2-core machine. Daemons run without
# systemd (started here, pids in $STATE), with proctrack/linuxproc and no cgroups, so it also
# works inside containers. Every step is time-bounded; `up` fails with the daemons' logs when the
# node does not come up within GEOMX_SLURM_UP_TIMEOUT seconds (default 60).
#
# The configuration goes to /etc/slurm/slurm.conf only if that file is absent or was written by
# this script (it carries the marker below); an existing, foreign slurm.conf is never replaced.
set -euo pipefail

STATE=${GEOMX_SLURM_STATE:-/var/lib/geomx-slurm-local}
CPUS=${GEOMX_SLURM_CPUS:-16}
UP_TIMEOUT=${GEOMX_SLURM_UP_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by geomx scripts/slurm-local.sh"
HOSTS_MARKER="# geomx-slurm-local"

log() { echo "slurm-local: $*" >&2; }
die() { log "$*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (apt-get install, daemons)"; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge with apt"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -q >&2 || log "apt-get update failed; trying the install anyway"
  timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge >&2
}

write_config() {
  local host=$1
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not replacing it"
  fi
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
  cat >"$CONF" <<EOF
$MARKER
ClusterName=geomx-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=$host CPUs=$CPUS State=UNKNOWN
PartitionName=geomx Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  [ -s /etc/munge/munge.key ] || timeout 30 mungekey --create --force >&2 \
    || timeout 30 /usr/sbin/create-munge-key -f >&2
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then
    timeout 30 runuser -u munge -- /usr/sbin/munged >&2
  else
    timeout 30 /usr/sbin/munged --force >&2
  fi
  touch "$STATE/munged.ours"
  for _ in $(seq 50); do
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
      return
    fi
    sleep 0.2
  done
  die "munged did not come up"
}

node_up() {
  timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

cmd_up() {
  need_root
  install_packages
  local host
  host=$(hostname -s)
  if [ -z "$(getent hosts "$host" || true)" ]; then
    # Slurm and the jobs' coordinator address need the node's name to resolve.
    log "hostname $host does not resolve: adding it to /etc/hosts (removed by down)"
    echo "127.0.0.1 $host $HOSTS_MARKER" >>/etc/hosts
  fi
  write_config "$host"
  start_munge
  running "$STATE/slurmctld.pid" || timeout 30 slurmctld >&2
  running "$STATE/slurmd.pid" || timeout 30 slurmd >&2
  local waited=0
  until node_up; do
    if [ "$waited" -ge "$UP_TIMEOUT" ]; then
      log "the node did not come up within ${UP_TIMEOUT}s"
      timeout 10 sinfo -N -l >&2 || true
      tail -n 30 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
      exit 1
    fi
    # A node left DOWN by an earlier run comes back here.
    timeout 10 scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
    waited=$((waited + 1))
  done
  log "up: node $host with $CPUS CPUs, partition geomx ($(sinfo -V))"
}

cmd_status() {
  node_up
}

stop_pidfile() {
  local f=$1
  if running "$f"; then
    local pid
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cmd_down() {
  need_root
  if command -v scancel >/dev/null && node_up; then
    timeout 10 scancel --user=root >/dev/null 2>&1 || true
  fi
  stop_pidfile "$STATE/slurmd.pid"
  stop_pidfile "$STATE/slurmctld.pid"
  # munged: only if `up` started it.
  if [ -f "$STATE/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid
  fi
  rm -rf "$STATE"
  if grep -qF "$HOSTS_MARKER" /etc/hosts; then
    # Rewrite in place (the file may be a bind mount that cannot be replaced).
    local kept
    kept=$(grep -vF "$HOSTS_MARKER" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
  fi
  if [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF"; then
    rm -f "$CONF"
  fi
  log "down"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
