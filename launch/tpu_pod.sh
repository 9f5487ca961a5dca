#!/usr/bin/env bash
# Runs a clara command on every worker of a Cloud TPU VM slice (a pod slice has one JAX process
# per host; JAX finds the others itself, CLARA_DISTRIBUTED=cluster). The command runs detached
# on the workers (launch/tpu_job.sh under setsid + nohup), so it survives this script and the
# ssh session; each worker logs to REMOTE_DIR/logs/worker_<hostname>.log.
#
# Usage: launch/tpu_pod.sh [run] --name NAME --zone ZONE [options] -- <clara command and flags>
#        launch/tpu_pod.sh logs --name NAME --zone ZONE [--logdir DIR] [--remote_dir DIR]
#        launch/tpu_pod.sh stop --name NAME --zone ZONE [--remote_dir DIR]
#   e.g. launch/tpu_pod.sh --name clara-v5e --zone us-west4-a --accelerator v5litepod-16 \
#          --queued --spot --max_retries 5 -- \
#          clara train --config=configs/mistral_7b.py --workdir=gs://bucket/run1
#
#   run             (the default) create the slice if asked, ship the tracked files, install,
#                   start the command detached on all workers and return (or --watch it)
#   logs            copy every worker's log to LOGDIR
#   stop            SIGTERM the job on every worker (clara train saves a checkpoint and
#                   exits); a --watch in progress then ends instead of relaunching it
#
#   --name          TPU VM name (also the queued resource's name with --queued)
#   --zone          its zone
#   --project       GCP project (default: gcloud's configured project)
#   --accelerator   slice type when creating (default v5litepod-16)
#   --version       TPU runtime when creating (default v2-alpha-tpuv5-lite)
#   --create        create the TPU VM when it does not exist (tpu-vm create)
#   --queued        create it through a queued resource (queued-resources create) and wait
#                   in the queue until it is ACTIVE
#   --spot          create a spot (preemptible) slice
#   --remote_dir    code directory on the workers (default clara_jax)
#   --logdir        where worker logs are copied back (default runs/tpu_logs/NAME; --watch
#                   copies each attempt's logs to LOGDIR/attempt_<k>/)
#   --skip_install  reuse the workers' virtual environment (a newly created slice installs)
#   --watch         wait for the job: poll every --poll_s seconds, copy the logs back, exit
#                   with the workers' status
#   --max_retries N with --create or --queued: when the slice is preempted (or the job was
#                   stopped by SIGTERM or lost), delete and re-create it if it is gone and
#                   relaunch the same command, at most N times (implies --watch). clara train
#                   resumes from the latest checkpoint in its --workdir, which must therefore
#                   live outside the slice (gs://, a Filestore mount)
#   --poll_s S      seconds between polls (default 300)
#   --dry_run       print every command instead of running it (no gcloud needed); with
#                   --max_retries the first poll is taken as a preemption, to show the retry
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
die() { echo "$*" >&2; exit 1; }

sub=run
case "${1:-}" in run|logs|stop) sub="$1"; shift ;; esac

name=""; zone=""; project=""; accelerator="v5litepod-16"; version="v2-alpha-tpuv5-lite"
create=0; queued=0; spot=0; remote_dir="clara_jax"; logdir=""; install=1; watch=0
max_retries=0; poll_s=300; dry_run=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --remote_dir) remote_dir="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --skip_install) install=0; shift ;;
    --watch) watch=1; shift ;;
    --max_retries) max_retries="$2"; shift 2 ;;
    --poll_s) poll_s="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    *) echo "unknown option '$1'" >&2; usage ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || { echo "--name and --zone are required" >&2; usage; }
[[ "$max_retries" =~ ^[0-9]+$ ]] || { echo "--max_retries must be a whole number, got '$max_retries'" >&2; usage; }
[[ "$poll_s" =~ ^[1-9][0-9]*$ ]] || { echo "--poll_s must be a positive whole number, got '$poll_s'" >&2; usage; }
can_create=$((create || queued))
if [[ $max_retries -gt 0 ]]; then
  [[ $can_create -eq 1 ]] || { echo "--max_retries needs --create or --queued (to re-create a preempted slice)" >&2; usage; }
  watch=1
fi
if [[ $sub == run ]]; then
  [[ $# -gt 1 && "$1" == "--" ]] || { echo "missing '-- <clara command>'" >&2; usage; }
  shift
fi
[[ -n "$logdir" ]] || logdir="runs/tpu_logs/$name"

# A dry run prints commands on the real stdout (fd 3) even from inside $(...).
exec 3>&1
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
words() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  echo "$out"
}
show() { echo "+ $(words "$@")" >&3; }
# act: a command that changes something (printed in a dry run). ask: a query whose answer the
# script reads; a dry run prints it and answers with its first argument ("!fail": it fails).
act() { if [[ $dry_run -eq 1 ]]; then show "$@"; else "$@"; fi; }
ask() {
  local canned="$1"; shift
  if [[ $dry_run -eq 0 ]]; then "$@"; return; fi
  show "$@"
  [[ "$canned" != "!fail" ]] || return 1
  echo "$canned"
}
pause() { if [[ $dry_run -eq 0 ]]; then sleep "$poll_s"; fi; }

gc=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
where=(--zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")
dry_node=READY  # the dry run's stand-in for the slice's state
[[ $can_create -eq 1 ]] && dry_node=MISSING

# A describe query (ask's arguments): the state it prints; MISSING when gcloud says not found;
# UNKNOWN when it failed otherwise (its error on stderr), so that a network hiccup is never
# taken for a lost slice and a working one deleted.
query_state() {
  local out
  if out=$(ask "$@" 2> /dev/null); then echo "$out"; return; fi
  if [[ $dry_run -eq 1 ]]; then echo MISSING; return; fi
  out=$(ask "$@" 2>&1 > /dev/null) || true
  if grep -qiE 'not.?found' <<< "$out"; then echo MISSING; else echo "$out" >&2; echo UNKNOWN; fi
}

# The slice as one word: READY, MISSING, UNKNOWN, the queued resource's state while it is not
# ACTIVE (WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDED, FAILED, ...), else the node's state
# (PREEMPTED, CREATING, REPAIRING, ...).
slice_state() {
  local st canned=$dry_node
  if [[ $queued -eq 1 ]]; then
    case "$dry_node" in MISSING) canned="!fail" ;; PREEMPTED) canned=SUSPENDED ;; *) canned=ACTIVE ;; esac
    st=$(query_state "$canned" "${qr[@]}" describe "$name" "${where[@]}" \
      --format='value(state.state)')
    [[ "$st" == ACTIVE ]] || { echo "$st"; return; }
    canned=$dry_node
  fi
  [[ "$canned" == MISSING ]] && canned="!fail"
  query_state "$canned" "${gc[@]}" describe "$name" "${where[@]}" --format='value(state)'
}

# States in which the slice will not run the job again: it must be deleted and re-created.
gone() { [[ "$1" =~ ^(MISSING|PREEMPTED|TERMINATED|SUSPENDING|SUSPENDED|FAILED)$ ]]; }

create_slice() {
  local extra=()
  [[ $spot -eq 1 ]] && extra+=(--spot)
  if [[ $queued -eq 1 ]]; then
    act "${qr[@]}" create "$name" --node-id "$name" "${where[@]}" \
      --accelerator-type "$accelerator" --runtime-version "$version" "${extra[@]}"
  else
    act "${gc[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" \
      --version "$version" "${extra[@]}"
  fi
  dry_node=READY
}

delete_slice() {
  if [[ $queued -eq 1 ]]; then  # --force deletes the queued resource's node with it
    act "${qr[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    act "${gc[@]}" delete "$name" "${where[@]}" --quiet
  fi
  dry_node=MISSING
}

# Leaves a READY slice, creating (or re-creating) it when allowed; sets fresh=1 when it did.
ensure_slice() {
  local st last=""
  fresh=0
  st=$(slice_state)
  if gone "$st" && [[ "$st" != MISSING ]]; then
    [[ $can_create -eq 1 ]] || die "TPU VM '$name' is $st (pass --create or --queued to re-create it)"
    delete_slice
    st=MISSING
  fi
  if [[ "$st" == MISSING ]]; then
    [[ $can_create -eq 1 ]] || die "TPU VM '$name' not found in $zone (pass --create or --queued)"
    create_slice
    fresh=1
    st=$(slice_state)
  fi
  while [[ "$st" != READY ]]; do
    [[ "$st" != UNKNOWN ]] || die "gcloud could not describe TPU VM '$name' (its error is above)"
    ! gone "$st" || die "TPU VM '$name' became $st while waiting for it to be ready (gcloud compute tpus $([[ $queued -eq 1 ]] && echo queued-resources || echo tpu-vm) describe $name says why)"
    [[ "$st" == "$last" ]] || echo "TPU VM $name: $st, waiting (every ${poll_s}s)"
    last=$st
    pause
    st=$(slice_state)
  done
}

# The tracked files (no venv, no runs) as one archive on every worker.
ship_code() {
  local archive="/tmp/clara_jax_XXXXXX.tar.gz"
  if [[ $dry_run -eq 1 ]]; then
    echo "+ git ls-files -z | tar --null -czf $archive -T -" >&3
  else
    archive=$(mktemp --suffix=.tar.gz)
    git ls-files -z | tar --null -czf "$archive" -T -
  fi
  act "${gc[@]}" scp "$archive" "$name:/tmp/clara_jax.tar.gz" "${where[@]}" --worker=all
  [[ $dry_run -eq 1 ]] || rm -f "$archive"
  act "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    "mkdir -p $remote_dir && tar -xzf /tmp/clara_jax.tar.gz -C $remote_dir"
}

install_deps() {
  act "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    "cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q 'jax[tpu]==0.10.2' && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q --no-deps -e ."
}

# Detached: setsid gives the job its own session (no hang-up when ssh leaves) and nohup
# ignores SIGHUP besides; every descriptor is redirected so ssh does not wait on the job.
# Its pid (setsid execs in place, so also its process group) is written before ssh returns,
# so that a poll never finds a started job without one.
start_job() {
  local cmd
  printf -v cmd '%q ' "$@"
  act "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    "cd $remote_dir && mkdir -p logs && if [ -e logs/pid ] && [ ! -e logs/exit_code ] && kill -0 \$(cat logs/pid) 2> /dev/null; then echo \"a job is still running on \$(hostname) (tpu_pod.sh stop ends it)\" >&2; exit 1; fi && rm -f logs/exit_code logs/stop_requested && { setsid nohup bash launch/tpu_job.sh ${cmd}> /dev/null 2>&1 < /dev/null & } && echo \$! > logs/pid && echo \"started on \$(hostname)\""
}

launch() {
  ensure_slice
  ship_code
  if [[ $install -eq 1 || $fresh -eq 1 ]]; then install_deps; fi
  start_job "$@"
}

fetch_logs() {  # DIR: every worker's log, into DIR
  if [[ $dry_run -eq 1 ]]; then show mkdir -p "$1"; else mkdir -p "$1"; fi
  act "${gc[@]}" scp "$name:$remote_dir/logs/worker_*.log" "$1/" "${where[@]}" --worker=all \
    > /dev/null 2>&1 || { echo "could not copy the workers' logs to $1" >&2; return 1; }
}

# The job over all workers: running, done, failed:<status>, stopped (by `tpu_pod.sh stop`),
# preempted (stopped by SIGTERM after a checkpoint, or gone without a status: the host
# restarted) or unknown (ssh failed). Each worker answers clara-exit=<its logs/exit_code>,
# or running / lost from its pid, or stopped.
# shellcheck disable=SC2016  # expanded on the workers
probe='if [ -e logs/stop_requested ]; then echo clara-exit=stopped; else echo clara-exit=$(cat logs/exit_code 2> /dev/null || { kill -0 "$(cat logs/pid 2> /dev/null)" 2> /dev/null && echo running || echo lost; }); fi'
job_status() {
  local out codes
  out=$(ask "clara-exit=0" "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    "cd $remote_dir && $probe" 2> /dev/null) || { echo unknown; return; }
  codes=$(grep -o 'clara-exit=[^[:space:]]*' <<< "$out" | cut -d= -f2) || true
  if [[ -z "$codes" ]]; then echo unknown
  elif grep -qvE '^(0|running|preempted|lost|stopped)$' <<< "$codes"; then
    echo "failed:$(grep -vE '^(0|running|preempted|lost|stopped)$' <<< "$codes" | head -n 1)"
  elif grep -q '^stopped$' <<< "$codes"; then echo stopped
  elif grep -qE '^(preempted|lost)$' <<< "$codes"; then echo preempted
  elif grep -q '^running$' <<< "$codes"; then echo running
  else echo "done"
  fi
}

case "$sub" in
  logs)
    fetch_logs "$logdir" || exit 1
    echo "worker logs in $logdir"
    exit 0 ;;
  stop)
    act "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
      "cd $remote_dir && touch logs/stop_requested && kill -TERM -- -\$(cat logs/pid)"
    exit 0 ;;
esac

launch "$@"
again=(launch/tpu_pod.sh logs --name "$name" "${where[@]}" --remote_dir "$remote_dir" --logdir "$logdir")
if [[ $watch -eq 0 ]]; then
  echo "started on every worker of $name; fetch the logs with: $(words "${again[@]}")"
  exit 0
fi

retries=0
dry_preempt=$((dry_run && max_retries > 0))
while true; do
  pause
  if [[ $dry_preempt -eq 1 ]]; then
    echo "# dry run: this poll takes the slice as preempted, to show the retry" >&3
    dry_node=PREEMPTED; dry_preempt=0
  fi
  st=$(slice_state)
  job=preempted
  if [[ "$st" == READY ]]; then
    job=$(job_status)
    fetch_logs "$logdir/attempt_$retries" || true  # the next poll tries again
  elif ! gone "$st"; then
    echo "TPU VM $name: $st"
    continue
  fi
  case "$job" in
    running|unknown) continue ;;
    done) echo "done on every worker; logs in $logdir/attempt_$retries"; exit 0 ;;
    stopped) echo "stopped (tpu_pod.sh stop); logs in $logdir/attempt_$retries"; exit 0 ;;
    failed:*)
      echo "a worker exited with status ${job#failed:}; logs in $logdir/attempt_$retries (others may still be running: $(words launch/tpu_pod.sh stop --name "$name" "${where[@]}" --remote_dir "$remote_dir"))" >&2
      [[ "${job#failed:}" =~ ^[0-9]+$ ]] && exit "${job#failed:}"
      exit 1 ;;
  esac
  if [[ $retries -ge $max_retries ]]; then
    die "TPU VM $name: the job was preempted (slice $st) and $max_retries retries are used up; the same command resumes from the workdir's checkpoint"
  fi
  retries=$((retries + 1))
  echo "TPU VM $name: preempted (slice $st); retry $retries of $max_retries, resuming from the workdir's checkpoint"
  launch "$@"
done
