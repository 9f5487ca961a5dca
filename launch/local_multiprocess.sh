#!/usr/bin/env bash
# Runs a command as N JAX processes on this machine, on the CPU, with gloo collectives; each
# process gets its own share of simulated devices. Process 0's output streams to the terminal;
# every process also logs to LOGDIR/process_<i>.log. Exits non-zero if any process fails.
#
# Usage: launch/local_multiprocess.sh N [--devices_per_process D] [--port P] [--logdir DIR] \
#          [--dry_run] -- <command and its flags>
#   e.g. launch/local_multiprocess.sh 2 --devices_per_process 4 -- \
#          clara train --config=configs/tiny.py --workdir=runs/mp
#
#   N                      number of processes
#   --devices_per_process  simulated CPU devices per process (default 1)
#   --port                 coordinator port on 127.0.0.1 (default: a free port)
#   --logdir               per-process logs (default runs/multiprocess_logs)
#   --dry_run              print each process's environment, command and log, run nothing
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

# One command per line, each word quoted only when the shell needs it, so that a dry run's
# output can be pasted back into a shell.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() {
  local out="+" word
  for word in "$@"; do out+=" $(quote "$word")"; done
  echo "$out"
}

[[ $# -ge 1 ]] || usage
num="$1"; shift
[[ "$num" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$num'" >&2; usage; }
devices=1
port=""
logdir="runs/multiprocess_logs"
dry_run=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --devices_per_process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    *) echo "unknown option '$1'" >&2; usage ;;
  esac
done
[[ $# -gt 1 && "$1" == "--" ]] || { echo "missing '-- <command>'" >&2; usage; }
shift
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# The caller's own XLA flags come along; each process gets its share of fake CPU devices.
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

if [[ $dry_run -eq 1 ]]; then
  show mkdir -p "$logdir"
  for ((i = 0; i < num; i++)); do
    line=$(show env CLARA_COORDINATOR="127.0.0.1:$port" CLARA_NUM_PROCESSES="$num" \
      CLARA_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
      XLA_FLAGS="$xla_flags" "$@")
    log=$(quote "$logdir/process_$i.log")
    if [[ $i -eq 0 ]]; then echo "$line 2>&1 | tee $log &"; else echo "$line > $log 2>&1 &"; fi
  done
  exit 0
fi
mkdir -p "$logdir"

pids=()
# shellcheck disable=SC2329  # called from the trap
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  log="$logdir/process_$i.log"
  if [[ $i -eq 0 ]]; then
    (CLARA_COORDINATOR="127.0.0.1:$port" CLARA_NUM_PROCESSES="$num" CLARA_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" \
      "$@" 2>&1 | tee "$log"; exit "${PIPESTATUS[0]}") &
  else
    CLARA_COORDINATOR="127.0.0.1:$port" CLARA_NUM_PROCESSES="$num" CLARA_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" \
      "$@" > "$log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; last lines of $logdir/process_$i.log:" >&2
    tail -n 20 "$logdir/process_$i.log" >&2
    status=1
  fi
done
exit "$status"
