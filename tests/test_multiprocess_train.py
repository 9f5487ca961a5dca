"""Scaling out on this machine: 2 processes x 4 CPU devices train like 1 process x 8 devices,
and a checkpoint written by the 2-process run restores in 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

STEPS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_config):
    from clara_jax.data.prepare import prepare_world

    out = tmp_path_factory.mktemp("world")
    prepare_world(out, tiny_config, formats=("stage1",))
    return out


def _train_args(workdir, data_dir, steps):
    return [sys.executable, "-m", "clara_jax.cli", "train", "--config=configs/tiny.py",
            f"--workdir={workdir}", f"--data_dir={data_dir}", "--progress=false",
            f"--config.train.steps={steps}", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={STEPS}", "--config.mesh.data=-1",
            "--config.train.batch_size=8"]


def _one_process(workdir, data_dir, steps, devices=8):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run(_train_args(workdir, data_dir, steps), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_two_processes_log_the_losses_of_one_and_their_checkpoint_restores_in_one(
        tmp_path, data_dir):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _one_process(single, data_dir, STEPS + 2)
    out = subprocess.run(
        [str(REPO / "launch" / "local_multiprocess.sh"), "2", "--devices_per_process", "4",
         "--logdir", str(tmp_path / "logs"), "--", *_train_args(multi, data_dir, STEPS)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = _losses(single), _losses(multi)
    assert sorted(two) == list(range(1, STEPS + 1))
    print("step  1 process x 8 devices   2 processes x 4 devices")
    for step in sorted(two):
        print(f"{step:4d}  {one[step]:.6f}              {two[step]:.6f}")
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4)

    # The 2-process checkpoint continues in a single process (one device) where the
    # uninterrupted single-process run went.
    _one_process(multi, data_dir, STEPS + 2, devices=1)
    resumed = _losses(multi)
    for step in (STEPS + 1, STEPS + 2):
        assert resumed[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4)
