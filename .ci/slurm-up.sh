#!/usr/bin/env bash
# Start a private single-node SLURM cluster on 127.0.0.1 for tests (no systemd: daemons by hand).
#
#   eval "$(.ci/slurm-up.sh)"     # installs slurm-wlm + munge if missing, starts munged, slurmctld,
#                                 # slurmd; prints `export SLURM_CONF=...` for the client commands
#   .ci/slurm-down.sh             # stops them by the pids recorded here
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives in $DDM_SLURM_DIR
# (default /tmp/ddm-slurm), so nothing in /etc is touched and a system munged is left alone.
# Needs root (slurmd runs jobs as their submitting user). On failure prints the daemons' log
# tails to stderr and exits non-zero. Partition "debug" matches slurm/local-test.yaml.
set -euo pipefail
DIR=${DDM_SLURM_DIR:-/tmp/ddm-slurm}
here=$(cd "$(dirname "$0")" && pwd)

fail() {
  echo "slurm-up: $*" >&2
  for f in "$DIR"/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd.log; do
    [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  "$here/slurm-down.sh" >&2 || true
  exit 1
}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }; } \
    || fail "could not install slurm-wlm and munge with apt-get (run as root with network access)"
fi
[ "$(id -u)" = 0 ] || fail "must run as root to start slurmd"

"$here/slurm-down.sh" >/dev/null 2>&1 || true   # a previous cluster of ours, if any
rm -rf "$DIR"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chmod 711 "$DIR/munge"   # jobs of any user reach the socket; the key itself is 0400

# munge: a private key and socket
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed" \
  || fail "munged did not start"

host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat > "$DIR/slurm.conf" <<CONF
ClusterName=ddmtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${DDM_SLURMCTLD_PORT:-6817}
SlurmdPort=${DDM_SLURMD_PORT:-6818}
SchedulerParameters=sched_interval=1
MessageTimeout=20
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -i -f "$SLURM_CONF" || fail "slurmctld did not start"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start"

for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case "$state" in idle*|mix*|alloc*) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;; esac
  sleep 1
done
fail "node $host did not become idle within 60 s (sinfo state: '${state:-none}')"
