"""Launch scripts: bash -n and shellcheck; multi-process start-up on this machine; each
launcher's --dry_run (the exact commands, with gcloud / srun / scontrol replaced by stubs that
fail the test if called); and the TPU worker side (launch/tpu_job.sh) run here for real from
the command line the dry run prints: detached start, exit status, preemption, stop."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clara_jax.distributed import DistributedInitError, resolve
from tests.conftest import REPO

SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "launch").glob("*.sbatch"))
SHELLCHECK = Path(sys.executable).parent / "shellcheck"


def test_all_launchers_are_present():
    assert {p.name for p in SCRIPTS} >= {"local_multiprocess.sh", "tpu_pod.sh", "tpu_job.sh",
                                         "gpu_slurm.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launcher_parses_and_passes_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([str(SHELLCHECK), "--shell=bash", str(script)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout


def _launch(tmp_path, *command, n=2, devices=4):
    return subprocess.run(
        [str(REPO / "launch" / "local_multiprocess.sh"), str(n), "--devices_per_process",
         str(devices), "--logdir", str(tmp_path), "--", *command],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_two_local_processes_find_each_other(tmp_path):
    out = _launch(tmp_path, sys.executable, str(REPO / "tests" / "multiprocess_probe.py"),
                  str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    seen = [json.loads((tmp_path / f"probe_{i}.json").read_text()) for i in range(2)]
    for i, s in enumerate(seen):
        assert s == {"process_index": i, "process_count": 2, "devices": 8, "local_devices": 4,
                     "gathered": [0, 1], "main": i == 0}


def test_a_failing_process_fails_the_launch(tmp_path):
    code = "import os, sys; sys.exit(3 if os.environ['CLARA_PROCESS_ID'] == '1' else 0)"
    out = _launch(tmp_path, sys.executable, "-c", code)
    assert out.returncode != 0 and "process 1 failed" in out.stderr


def test_usage_errors(tmp_path):
    out = _launch(tmp_path, n=2)
    assert out.returncode == 2 and "missing '-- <command>'" in out.stderr


def test_resolve_reads_environment_and_flags_win():
    env = {"CLARA_COORDINATOR": "10.0.0.1:1234", "CLARA_NUM_PROCESSES": "4",
           "CLARA_PROCESS_ID": "3"}
    s = resolve({}, env)
    assert (s.mode, s.coordinator_address, s.num_processes, s.process_id) == (
        "auto", "10.0.0.1:1234", 4, 3)
    assert resolve({"process_id": 1}, env).process_id == 1
    assert resolve({}, {}).num_processes is None
    assert resolve({}, {"CLARA_DISTRIBUTED": "cluster"}).mode == "cluster"


@pytest.mark.parametrize("env,message", [
    ({"CLARA_NUM_PROCESSES": "2", "CLARA_PROCESS_ID": "0"}, "coordinator_address not given"),
    ({"CLARA_NUM_PROCESSES": "2", "CLARA_COORDINATOR": "h:1", "CLARA_PROCESS_ID": "2"},
     "outside [0, num_processes=2)"),
    ({"CLARA_NUM_PROCESSES": "two"}, "is not an integer"),
    ({"CLARA_DISTRIBUTED": "mpi"}, "not one of"),
])
def test_resolve_errors_are_clear(env, message):
    with pytest.raises(DistributedInitError) as err:
        resolve({}, env)
    assert message in str(err.value)


def test_unreachable_coordinator_times_out_with_a_clear_error():
    code = ("from clara_jax import distributed as d; "
            "d.initialize(d.Settings('auto', '127.0.0.1:9', 2, 1, timeout_s=3))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    assert "coordinator 127.0.0.1:9 as process 1 of 2 within 3s" in out.stderr


# ---- dry runs -------------------------------------------------------------------------------

CLUSTER_TOOLS = ("gcloud", "srun", "scontrol", "sbatch")


@pytest.fixture
def stub_path(tmp_path):
    """PATH with the cluster tools replaced by stubs that record a call and fail, so a dry run
    that runs one of them fails its test (whether or not the real tool is installed)."""
    bindir = tmp_path / "stub_bin"
    bindir.mkdir()
    calls = tmp_path / "stub_calls"
    for tool in CLUSTER_TOOLS:
        stub = bindir / tool
        stub.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\nexit 1\n")
        stub.chmod(0o755)
    return f"{bindir}{os.pathsep}{os.environ['PATH']}", calls


def _dry(stub_path, script, *args, env=None):
    """(stdout lines, stderr) of `bash launch/SCRIPT ARGS` in the repository root; fails when
    a stubbed cluster tool was called."""
    path, calls = stub_path
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CLARA_"))}
    run_env.update(env or {}, PATH=path)
    out = subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO, env=run_env,
                         capture_output=True, text=True, timeout=60)
    assert not calls.exists(), f"the dry run called {calls.read_text()}"
    return out


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands ('+ ...' lines), split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_slurm_output_path_needs_no_directory_slurm_would_have_to_make():
    """Slurm opens --output before the script runs and creates no directory for it: a path
    under a per-job directory (runs/slurm-%j/...) kills the job with no log at all."""
    text = (REPO / "launch" / "gpu_slurm.sbatch").read_text()
    paths = re.findall(r"^#SBATCH --(?:output|error)=(\S+)", text, re.M)
    assert paths == ["slurm-%j.out"]
    assert all("%" not in os.path.dirname(p) for p in paths)


def test_slurm_dry_run_prints_environment_logs_and_srun(stub_path):
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu[03-04]", "CLARA_PORT": "2222"}
    out = _dry(stub_path, "gpu_slurm.sbatch", "--dry_run", "clara", "train", "--workdir=/a b",
               env=env)
    assert out.returncode == 0, out.stderr
    assert "job 77: 16 processes on 2 node(s), coordinator gpu03:2222" in out.stdout
    cmds = _commands(out.stdout)
    assert cmds[0] == ["export", "CLARA_COORDINATOR=gpu03:2222", "CLARA_NUM_PROCESSES=16"]
    assert cmds[1] == ["export", f"PATH={REPO}/.venv/bin:$PATH"]
    assert cmds[2] == ["mkdir", "-p", "runs/slurm-77"]
    srun = cmds[3]
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--output=runs/slurm-77/process_%t.log"]
    assert srun[-3:] == ["clara", "train", "--workdir=/a b"]
    assert not (REPO / "runs" / "slurm-77").exists()  # a dry run makes nothing
    # The per-task wrapper srun would start, run here: each task's rank becomes its process id.
    probe = [sys.executable, "-c", "import os; print(os.environ['CLARA_PROCESS_ID'])"]
    task = subprocess.run(srun[3:srun.index("clara")] + probe, capture_output=True, text=True,
                          env=dict(os.environ, SLURM_PROCID="5"), timeout=60)
    assert task.stdout.strip() == "5"


def test_slurm_placeholders_outside_a_job_and_refusal_without_dry_run(stub_path):
    out = _dry(stub_path, "gpu_slurm.sbatch", "--dry_run", "clara", "train")
    assert out.returncode == 0, out.stderr
    assert ["export", "CLARA_COORDINATOR=HEAD_NODE:12345", "CLARA_NUM_PROCESSES=NTASKS"] in \
        _commands(out.stdout)
    out = _dry(stub_path, "gpu_slurm.sbatch", "clara", "train")
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr


def test_local_dry_run_prints_each_process_and_starts_none(stub_path, tmp_path):
    marker = tmp_path / "ran"
    out = _dry(stub_path, "local_multiprocess.sh", "2", "--devices_per_process", "4", "--port",
               "4321", "--logdir", str(tmp_path / "logs"), "--dry_run", "--", sys.executable,
               "-c", f"open({str(marker)!r}, 'w')")
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith("+ ")]
    assert len(lines) == 3 and shlex.split(lines[0][2:]) == ["mkdir", "-p", str(tmp_path / "logs")]
    for i, line in enumerate(lines[1:]):
        words = shlex.split(line[2:])
        assert words[:6] == ["env", "CLARA_COORDINATOR=127.0.0.1:4321", "CLARA_NUM_PROCESSES=2",
                             f"CLARA_PROCESS_ID={i}", "JAX_PLATFORMS=cpu",
                             f"XLA_FLAGS={os.environ['XLA_FLAGS']} "
                             "--xla_force_host_platform_device_count=4"]
        assert words[6:9] == [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
        log = str(tmp_path / "logs" / f"process_{i}.log")
        assert words[9:] == (["2>&1", "|", "tee", log, "&"] if i == 0 else [">", log, "2>&1", "&"])
    assert not marker.exists() and not (tmp_path / "logs").exists()


TPU = ["--name", "n1", "--zone", "us-west4-a", "--project", "p1"]
WHERE = ["--zone", "us-west4-a", "--project", "p1"]
GC = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]


def _ssh_commands(cmds):
    """The --command strings of the printed `tpu-vm ssh` calls, in order."""
    return [c[c.index("--command") + 1] for c in cmds if c[:5] == GC + ["ssh"]]


def test_tpu_dry_run_queued_spot_slice_with_a_retry(stub_path):
    out = _dry(stub_path, "tpu_pod.sh", *TPU, "--queued", "--spot", "--max_retries", "2",
               "--dry_run", "--", "clara", "train", "--workdir=gs://b/run 1")
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    create = QR + ["create", "n1", "--node-id", "n1", *WHERE, "--accelerator-type",
                   "v5litepod-16", "--runtime-version", "v2-alpha-tpuv5-lite", "--spot"]
    delete = QR + ["delete", "n1", *WHERE, "--force", "--quiet"]
    assert cmds.count(create) == 2 and cmds.count(delete) == 1
    # Created, then (the dry run's preemption) deleted and created again, before the relaunch.
    assert cmds.index(create) < cmds.index(delete) < len(cmds) - cmds[::-1].index(create) - 1
    starts = [c for c in _ssh_commands(cmds) if "tpu_job.sh" in c]
    assert len(starts) == 2  # the first launch and the retry
    assert ("{ setsid nohup bash launch/tpu_job.sh clara train --workdir=gs://b/run\\ 1 "
            "> /dev/null 2>&1 < /dev/null & }") in starts[0]
    assert starts[0] == starts[1]
    assert "retry 1 of 2, resuming from the workdir's checkpoint" in out.stdout
    probes = [c for c in _ssh_commands(cmds) if "clara-exit=" in c]
    assert probes and cmds[-1] == GC + ["scp", "n1:clara_jax/logs/worker_*.log",
                                        "runs/tpu_logs/n1/attempt_1/", *WHERE, "--worker=all"]
    assert "done on every worker; logs in runs/tpu_logs/n1/attempt_1" in out.stdout


def test_tpu_dry_run_plain_create_detached_and_logs(stub_path):
    out = _dry(stub_path, "tpu_pod.sh", *TPU, "--create", "--accelerator", "v4-32", "--dry_run",
               "--", "clara", "train")
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    assert cmds[0] == GC + ["describe", "n1", *WHERE, "--format=value(state)"]
    assert cmds[1] == GC + ["create", "n1", *WHERE, "--accelerator-type", "v4-32", "--version",
                            "v2-alpha-tpuv5-lite"]
    assert GC + ["scp", "/tmp/clara_jax_XXXXXX.tar.gz", "n1:/tmp/clara_jax.tar.gz", *WHERE,
                 "--worker=all"] in cmds
    ssh = _ssh_commands(cmds)
    assert "pip install -q 'jax[tpu]==0.10.2'" in ssh[1]  # a new slice installs
    assert "tpu_job.sh clara train" in ssh[2] and len(ssh) == 3  # detached: no wait, no poll
    assert "fetch the logs with: launch/tpu_pod.sh logs --name n1" in out.stdout
    out = _dry(stub_path, "tpu_pod.sh", "logs", *TPU, "--logdir", "somewhere", "--dry_run")
    assert _commands(out.stdout)[-1] == GC + ["scp", "n1:clara_jax/logs/worker_*.log",
                                              "somewhere/", *WHERE, "--worker=all"]


def test_tpu_usage_errors(stub_path):
    out = _dry(stub_path, "tpu_pod.sh", *TPU, "--max_retries", "2", "--dry_run", "--", "x")
    assert out.returncode == 2 and "--max_retries needs --create or --queued" in out.stderr
    out = _dry(stub_path, "tpu_pod.sh", *TPU, "--create", "--max_retries", "two", "--", "x")
    assert out.returncode == 2 and "--max_retries must be a whole number" in out.stderr
    out = _dry(stub_path, "tpu_pod.sh", *TPU, "--dry_run")
    assert out.returncode == 2 and "missing '-- <clara command>'" in out.stderr


# ---- the TPU worker side, run here ----------------------------------------------------------

def _worker_commands(stub_path, code_dir, command):
    """(start, probe, stop) command lines the launcher would send to every worker."""
    common = [*TPU, "--remote_dir", str(code_dir), "--dry_run"]
    run = _dry(stub_path, "tpu_pod.sh", *common, "--watch", "--poll_s", "1", "--", *command)
    ssh = _ssh_commands(_commands(run.stdout))
    stop = _ssh_commands(_commands(_dry(stub_path, "tpu_pod.sh", "stop", *common).stdout))
    return ([c for c in ssh if "tpu_job.sh" in c][0], [c for c in ssh if "clara-exit=" in c][0],
            stop[0])


def _sh(command: str, timeout=30) -> str:
    # The workers' shell; capture_output waits for every holder of stdout, so a start that
    # left the job attached to the ssh session would time out here.
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


def _status(probe, until=None, timeout=30) -> str:
    deadline = time.time() + timeout
    while True:
        status = _sh(probe).strip()
        if until is None or status != until or time.time() > deadline:
            return status
        time.sleep(0.1)


JOB = """
import json, os, signal, sys, time
def term(*_):
    print(json.dumps({"status": "preempted", "step": 4}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("worker up", os.environ["CLARA_DISTRIBUTED"], flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
mode = open(sys.argv[1]).read()
if mode == "preempted":
    term()
sys.exit(int(mode))
"""


def _worker_log(code_dir) -> str:
    logs = list((code_dir / "logs").glob("worker_*.log"))
    return logs[0].read_text() if logs else ""


@pytest.fixture
def code_dir(tmp_path):
    code = tmp_path / "code"
    (code / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "tpu_job.sh", code / "launch")
    yield code
    pid = code / "logs" / "pid"  # never leave a detached job behind
    if pid.exists():
        try:
            os.killpg(int(pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_tpu_worker_job_runs_detached_and_reports_its_status(stub_path, code_dir, tmp_path):
    go = tmp_path / "go"
    start, probe, _ = _worker_commands(stub_path, code_dir, [sys.executable, "-c", JOB, str(go)])
    for mode, expect in (("3", "clara-exit=3"), ("preempted", "clara-exit=preempted"),
                         ("0", "clara-exit=0")):
        go.unlink(missing_ok=True)
        assert "started on" in _sh(start)  # returned while the job waits for `go`
        assert _status(probe) == "clara-exit=running"
        go.write_text(mode)
        assert _status(probe, until="clara-exit=running") == expect
    text = _worker_log(code_dir)
    assert text.count("worker up cluster") == 3 and text.count("=== ") == 3  # appended


def test_tpu_stop_signals_the_job_which_still_records_its_status(stub_path, code_dir, tmp_path):
    start, probe, stop = _worker_commands(stub_path, code_dir,
                                          [sys.executable, "-c", JOB, str(tmp_path / "never")])
    _sh(start)
    assert _status(probe) == "clara-exit=running"
    deadline = time.time() + 30
    while "worker up cluster" not in _worker_log(code_dir):
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.05)  # its SIGTERM handler is installed before it says so
    second = subprocess.run(["bash", "-c", start], capture_output=True, text=True, timeout=30)
    assert second.returncode == 1 and "a job is still running on" in second.stderr
    _sh(stop)
    assert _status(probe) == "clara-exit=stopped"
    exit_code = code_dir / "logs" / "exit_code"
    while not exit_code.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert exit_code.read_text().strip() == "preempted", _worker_log(code_dir)
