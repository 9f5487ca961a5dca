"""The training loop: a run killed after a checkpoint, or stopped by SIGTERM, resumes to
exactly the uninterrupted run's losses; a non-finite loss stops naming the last good
checkpoint (or is skipped); a 2x2x2 mesh follows one device and checkpoints move between
meshes. (`clara train` on a prepared world, stopped by SIGTERM and resumed, runs in
tests/test_multiprocess_train.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, xla_flags

PY = sys.executable


@pytest.fixture(scope="module")
def env():
    """Subprocess environment: the session's persistent compilation cache (tests/conftest.py
    puts it in os.environ), so each run after the first, and the other test files' `clara
    train` runs of the tiny model, skip most of XLA's compile time."""
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return dict(os.environ, PYTHONPATH=str(REPO))


def _run(env, *args, expect_rc=0):
    res = subprocess.run([PY, str(REPO / "tests" / "train_run.py"), *map(str, args)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == expect_rc, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["ce"], r["mse"], r["grad_norm"]) for r in rows]


def test_kill_and_sigterm_resume_exactly(env, tmp_path):
    steps = 12
    full, cut = tmp_path / "full", tmp_path / "cut"
    # The reference run is also profiled (steps 2-3): tracing must not change what it computes.
    res = _run(env, full, 1, steps, "--profile_steps=2")
    _check_trace(full, res)
    reference = _losses(full)
    assert [r[0] for r in reference] == list(range(1, steps + 1))

    # SIGTERM while fetching batch 3: the step in flight finishes, is saved, exit status 0.
    res = _run(env, cut, 1, steps, "--sigterm_at=3")
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"status": "preempted", "step": 4}
    assert (cut / "checkpoints" / "4").is_dir()
    # Killed outright while fetching batch 8 (after the step-5 checkpoint was requested).
    _run(env, cut, 1, steps, "--kill_at=8", expect_rc=9)
    assert len(_losses(cut)) == 8  # it had logged past its last checkpoint
    res = _run(env, cut, 1, steps)
    assert "resumed from" in res.stdout
    assert _losses(cut) == reference  # exactly, dropout keys and data order included


def test_nonfinite_loss_stops_or_skips(env, tmp_path):
    # 12 steps, as the resume test runs: train.steps shapes the learning-rate schedule, so the
    # same count reuses that test's compiled step from the persistent cache.
    res = _run(env, tmp_path / "stop", 1, 12, "--nan_at=6", expect_rc=1)
    assert "non-finite loss or gradient at step 7" in res.stderr
    assert f"last good checkpoint: {tmp_path / 'stop' / 'checkpoints' / '5'}" in res.stderr
    _run(env, tmp_path / "skip", 1, 12, "--nan_at=6", "--nan_policy=skip")
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().split("\n")
            if x]
    assert rows[6]["step"] == 7 and rows[6]["loss"] is None and rows[6]["nonfinite"] == 1.0
    assert all(r["loss"] is not None for i, r in enumerate(rows) if i != 6)


def _check_trace(work, res):
    """A run with --profile_steps=2 wrote one trace of steps 2-3 next to its TensorBoard logs."""
    assert f"profiler: traced steps 2-3 into {work / 'tb' / 'plugins' / 'profile'}" in res.stdout
    traces = list((work / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    # Exactly the steps after the first carry the step annotation (the trace viewer's step
    # view reads it); the trace is read back with JAX's own XSpace reader.
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(traces[0].resolve()))
    steps = {int(dict(e.stats)["step_num"]) for plane in data.planes for line in plane.lines
             for e in line.events if e.name == "train"}
    assert steps == {2, 3}


def test_mesh_2x2x2_follows_one_device_and_checkpoints_move(env):
    e = dict(env, XLA_FLAGS=xla_flags(8))
    res = subprocess.run([PY, str(REPO / "tests" / "multidevice_train.py")], env=e, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    assert out["q_kernel_spec"][:2] == ["fsdp", "tensor"]  # really sharded
    assert out["max_loss_diff"] < 1e-4, out
    assert abs(out["eval_loss_8"] - out["eval_loss_1"]) < 1e-5, out
    assert out["restored_mesh_sizes"] == [1] and out["data_state"] == {"index": 4}
    assert out["roundtrip_8_1_8_equal"]
