#!/usr/bin/env bash
# Stop the test cluster started by .ci/slurm-up.sh, by the pids it recorded (no pkill).
DIR=${DDM_SLURM_DIR:-/tmp/ddm-slurm}
for name in slurmd slurmctld munged; do
  f="$DIR/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$f"
done
exit 0
