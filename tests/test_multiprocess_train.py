"""Scaling out on this machine: 2 processes x 2 CPU devices train like 1 process x 4 devices,
a checkpoint written by the 2-process run restores in 1 process, and SIGTERM to one process
(or to both, moments apart) stops both at the same saved step."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, xla_flags

STEPS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_config):
    from clara_jax.data.prepare import prepare_world

    out = tmp_path_factory.mktemp("world")
    prepare_world(out, tiny_config, formats=("stage1",))
    return out


def _train_args(workdir, data_dir, steps, checkpoint_every=STEPS):
    return [sys.executable, "-m", "clara_jax.cli", "train", "--config=configs/tiny.py",
            f"--workdir={workdir}", f"--data_dir={data_dir}", "--progress=false",
            f"--config.train.steps={steps}", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={checkpoint_every}", "--config.mesh.data=-1",
            "--config.train.batch_size=8"]


def _one_process(workdir, data_dir, steps, devices=4):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(devices))
    out = subprocess.run(_train_args(workdir, data_dir, steps), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_two_processes_log_the_losses_of_one_and_their_checkpoint_restores_in_one(
        tmp_path, data_dir):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _one_process(single, data_dir, STEPS + 2)
    out = subprocess.run(
        [str(REPO / "launch" / "local_multiprocess.sh"), "2", "--devices_per_process", "2",
         "--logdir", str(tmp_path / "logs"), "--", *_train_args(multi, data_dir, STEPS)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = _losses(single), _losses(multi)
    assert sorted(two) == list(range(1, STEPS + 1))
    print("step  1 process x 4 devices   2 processes x 2 devices")
    for step in sorted(two):
        print(f"{step:4d}  {one[step]:.6f}              {two[step]:.6f}")
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4)

    # The 2-process checkpoint continues in a single process (one device) where the
    # uninterrupted single-process run went.
    _one_process(multi, data_dir, STEPS + 2, devices=1)
    resumed = _losses(multi)
    for step in (STEPS + 1, STEPS + 2):
        assert resumed[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4)


def _start_two(workdir, data_dir, logdir, steps, **env_vars):
    """Two `clara train` processes x 1 device joined through a local coordinator (as
    launch/local_multiprocess.sh does), each logging to its own file. One device each: the
    stop is agreed between processes, and fewer fake devices run each step faster."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(2):
        env = dict(os.environ, CLARA_COORDINATOR=f"127.0.0.1:{port}", CLARA_NUM_PROCESSES="2",
                   CLARA_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=xla_flags(1), **env_vars)
        with open(logdir / f"process_{i}.log", "w") as log:
            args = _train_args(workdir, data_dir, steps, checkpoint_every=steps)
            procs.append(subprocess.Popen(args, cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT,
                                          text=True))
    return procs


def _stop_at_the_same_step(procs, logdir, workdir, signal_to, *, after_rows, gap_s=0.5):
    """Waits until metrics.jsonl has `after_rows` rows, sends SIGTERM to the processes in
    `signal_to`, `gap_s` apart, and returns the step both saved (asserting they agree);
    kills both on any failure so no process outlives the test."""
    metrics = workdir / "metrics.jsonl"
    try:
        # Start-up and compilation take most of it (minutes on a loaded 2-core machine).
        deadline = time.monotonic() + 600
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= after_rows):
            assert all(p.poll() is None for p in procs), _logs(logdir)
            assert time.monotonic() < deadline, "no training progress in 600 s\n" + _logs(logdir)
            time.sleep(0.2)
        for n, i in enumerate(signal_to):
            if n:
                time.sleep(gap_s)
            procs[i].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], _logs(logdir)
    results = [_result(logdir / f"process_{i}.log") for i in range(2)]
    assert [r["status"] for r in results] == ["preempted", "preempted"], results
    assert results[0]["step"] == results[1]["step"], results
    return results[0]["step"]


def _result(log):
    """The JSON line `clara train` prints last (the runtime may log after it)."""
    lines = [x for x in log.read_text().splitlines() if x.startswith('{"status"')]
    assert lines, log.read_text()[-2500:]
    return json.loads(lines[-1])


def _logs(logdir) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-2500:]
                     for p in sorted(logdir.glob("process_*.log")))


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_to_one_or_both_processes_saves_the_same_step_on_both(tmp_path, data_dir):
    """Each process used to check only its own flag: the signalled one left the collective
    step and the other waited in it for ever, with no checkpoint. Now the stop is agreed."""
    work = tmp_path / "run"
    forever = 100_000  # checkpoint_every too: only the preemption saves
    procs = _start_two(work, data_dir, tmp_path / "logs1", forever)
    first = _stop_at_the_same_step(procs, tmp_path / "logs1", work, signal_to=[1],
                                   after_rows=2)
    assert first in _saved_steps(work) and max(_saved_steps(work)) == first
    # What `clara train` reports and writes on the way.
    log = (tmp_path / "logs1" / "process_0.log").read_text()
    assert "compiled stage-1 step" in log and "per device: params" in log
    assert (work / "tb").is_dir()
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == 1 and rows[0]["tokens_per_s"] > 0
    assert {"step", "loss", "ce", "mse", "tokens_per_s"} <= set(rows[0])

    # Resumed by both, then both signalled 0.5 s apart (process 0 first): one save, one step.
    procs = _start_two(work, data_dir, tmp_path / "logs2", forever)
    second = _stop_at_the_same_step(procs, tmp_path / "logs2", work, signal_to=[0, 1],
                                    after_rows=first + 2)
    assert f"resumed from {work / 'checkpoints' / str(first)}" in _logs(tmp_path / "logs2")
    assert second > first and max(_saved_steps(work)) == second

    # Without JAX's preemption service the loop gathers the flags at every step instead.
    procs = _start_two(work, data_dir, tmp_path / "logs3", forever,
                       JAX_ENABLE_PREEMPTION_SERVICE="false")
    third = _stop_at_the_same_step(procs, tmp_path / "logs3", work, signal_to=[0],
                                   after_rows=second + 2)
    assert "SIGTERM: saving a checkpoint at the end of this step on every process" in _logs(
        tmp_path / "logs3")
    assert third > second and max(_saved_steps(work)) == third

    # One process continues from the agreed step, with a nearer end, and finishes there.
    out = _one_process(work, data_dir, third + 1, devices=1)
    assert f"resumed from {work / 'checkpoints' / str(third)}" in out.stdout
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["status"] == "done" and final["step"] == third + 1
    assert max(_saved_steps(work)) == third + 1
    assert sorted(_losses(work)) == list(range(1, third + 2))
