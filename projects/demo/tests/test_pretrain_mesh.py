"""Pretraining (projects.demo.pretrain) on a 2x2x2 mesh of 8 simulated devices follows one
device. Apart from test_pretrain.py so that the two heaviest halves of the pretraining
tests can run on different pytest-xdist workers (`--dist loadfile` keeps a file on one)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
from safetensors.numpy import load_file

from clara_jax import param_store
from clara_jax.model import ModelConfig, init_params
from projects.demo import pretrain
from tests.conftest import REPO, TINY_START_ARGS, xla_flags


def test_pretraining_on_a_2x2x2_mesh_matches_one_device(tiny_config, tiny_start, tmp_path):
    """The suite's tiny start (2 steps on one device) and, in a subprocess, the same steps
    (same worlds, batches and keys) on 8 simulated devices with data, fsdp and tensor axes
    of 2: the same params."""
    root, summary = tiny_start
    assert summary["steps"] == TINY_START_ARGS["max_steps"]
    script = (
        "import jax, sys\n"
        "from clara_jax.config import load_config_file\n"
        "from projects.demo import pretrain\n"
        "assert jax.device_count() == 8\n"
        "c = load_config_file('configs/tiny.py', ['mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'])\n"
        f"pretrain.pretrain(c, {str(root / 'tok')!r}, {str(tmp_path / 'eight')!r}, "
        f"log=lambda _: None, **{TINY_START_ARGS!r})\n")
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(str(root / "out" / pretrain.PARAMS_FILE))
    b = load_file(str(tmp_path / "eight" / pretrain.PARAMS_FILE))
    assert set(a) == set(b)
    start = param_store.flatten(init_params(ModelConfig.from_config(tiny_config),
                                            jax.random.key(int(tiny_config.train.seed))))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, rtol=1e-3, err_msg=k)
    assert any(not np.allclose(a[k], start[k]) for k in a)
