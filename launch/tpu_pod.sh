#!/usr/bin/env bash
# Runs a clara command on every worker of a Cloud TPU VM slice (a pod slice has one JAX process
# per host; JAX finds the others itself, CLARA_DISTRIBUTED=cluster).
#
# Usage: launch/tpu_pod.sh --name NAME --zone ZONE [--project P] [--accelerator TYPE]
#          [--version RUNTIME] [--create] [--spot] [--remote_dir DIR] [--logdir DIR]
#          [--skip_install] -- <clara command and its flags>
#   e.g. launch/tpu_pod.sh --name clara-v5e --zone us-west4-a --accelerator v5litepod-16 \
#          --create -- clara train --config=configs/mistral_7b.py --workdir=gs://bucket/run1
#
#   --name          TPU VM name (created with --create when it does not exist, else reused)
#   --zone          its zone
#   --project       GCP project (default: gcloud's configured project)
#   --accelerator   slice type for --create (default v5litepod-16)
#   --version       TPU runtime for --create (default v2-alpha-tpuv5-lite)
#   --spot          create a spot (preemptible) slice; training resumes from its checkpoints
#   --remote_dir    code directory on the workers (default clara_jax)
#   --logdir        where worker logs are copied back (default runs/tpu_logs/NAME)
#   --skip_install  reuse the workers' existing virtual environment
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

name=""; zone=""; project=""; accelerator="v5litepod-16"; version="v2-alpha-tpuv5-lite"
create=0; spot=0; remote_dir="clara_jax"; logdir=""; install=1
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --remote_dir) remote_dir="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --skip_install) install=0; shift ;;
    *) echo "unknown option '$1'" >&2; usage ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || { echo "--name and --zone are required" >&2; usage; }
[[ $# -gt 1 && "$1" == "--" ]] || { echo "missing '-- <clara command>'" >&2; usage; }
shift
[[ -n "$logdir" ]] || logdir="runs/tpu_logs/$name"

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")

if ! "${gc[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
  [[ $create -eq 1 ]] || { echo "TPU VM '$name' not found in $zone (pass --create)" >&2; exit 1; }
  extra=()
  [[ $spot -eq 1 ]] && extra+=(--spot)
  "${gc[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" \
    --version "$version" "${extra[@]}"
fi
workers=$("${gc[@]}" describe "$name" "${where[@]}" --format='value(networkEndpoints.len())')
echo "TPU VM $name: $workers worker(s)"

# Ship the tracked files (no venv, no runs) as one archive to every worker.
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git ls-files -z | tar --null -czf "$archive" -T -
"${gc[@]}" scp "$archive" "$name:/tmp/clara_jax.tar.gz" "${where[@]}" --worker=all
"${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
  "mkdir -p $remote_dir && tar -xzf /tmp/clara_jax.tar.gz -C $remote_dir"

if [[ $install -eq 1 ]]; then
  "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    "cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q 'jax[tpu]==0.10.2' \
     && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q --no-deps -e ."
fi

# Every worker runs the same command and keeps its own log; ssh returns when all are done.
printf -v cmd '%q ' "$@"
status=0
"${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command \
  "cd $remote_dir && mkdir -p logs && export PATH=\$PWD/.venv/bin:\$PATH CLARA_DISTRIBUTED=cluster \
   && ($cmd) 2>&1 | tee logs/worker_\$(hostname).log; exit \${PIPESTATUS[0]}" || status=$?

mkdir -p "$logdir"
for ((w = 0; w < workers; w++)); do
  "${gc[@]}" scp "$name:$remote_dir/logs/*" "$logdir/" "${where[@]}" --worker="$w" \
    > /dev/null 2>&1 || echo "could not copy worker $w's log" >&2
done
echo "worker logs in $logdir"
exit "$status"
