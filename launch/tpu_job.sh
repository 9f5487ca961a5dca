#!/usr/bin/env bash
# Runs on every TPU worker, in the code directory, started detached by launch/tpu_pod.sh (so
# it outlives the ssh session that started it): the command, with the workers' .venv on PATH
# and CLARA_DISTRIBUTED=cluster (JAX finds the pod's other hosts itself), its output appended
# to logs/worker_<hostname>.log. It records:
#   logs/pid        its own pid, the job's process group (tpu_pod.sh stop signals it; the
#                   launcher writes it too, before its ssh returns)
#   logs/exit_code  when the command ends: its exit status, or "preempted" when it exited 0
#                   after a SIGTERM checkpoint (clara train's last line says so), so that the
#                   launcher relaunches it rather than reporting the run done
#
# Usage: launch/tpu_job.sh <command and its flags>
set -uo pipefail
# SIGTERM (tpu_pod.sh stop signals the whole group; a spot preemption's shutdown signals every
# process) must reach the command, which saves a checkpoint, but not end this script before it
# records the status: the script ignores it, and the command gets the default disposition
# back (env --default-signal; an ignored signal would be inherited), so the status recorded
# is the command's own.
trap '' TERM

[[ $# -ge 1 ]] || { echo "usage: launch/tpu_job.sh <command and its flags>" >&2; exit 2; }
mkdir -p logs
log="logs/worker_$(hostname).log"
rm -f logs/exit_code
# Renamed into place: a poll reading the file mid-write would see no pid and call the job lost.
echo "$$" > logs/pid.tmp && mv logs/pid.tmp logs/pid
export PATH="$PWD/.venv/bin:$PATH" CLARA_DISTRIBUTED=cluster
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >> "$log"
env --default-signal=TERM "$@" >> "$log" 2>&1 < /dev/null
rc=$?
if [[ $rc -eq 0 ]] && tail -n 1 "$log" | grep -q '"status": "preempted"'; then
  rc=preempted
fi
# Written whole then renamed: a poll never reads a half-written status.
echo "$rc" > logs/exit_code.tmp && mv logs/exit_code.tmp logs/exit_code
