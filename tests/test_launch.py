"""Launch scripts (bash -n, shellcheck) and multi-process start-up on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clara_jax.distributed import DistributedInitError, resolve
from tests.conftest import REPO

SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "launch").glob("*.sbatch"))
SHELLCHECK = Path(sys.executable).parent / "shellcheck"


def test_all_launchers_are_present():
    assert {p.name for p in SCRIPTS} >= {"local_multiprocess.sh", "tpu_pod.sh",
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
