"""Logical axis rules and the mesh: sharded execution equals one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec

from clara_jax.model.sharding import DEFAULT_RULES, make_mesh
from tests.conftest import REPO, xla_flags


def test_make_mesh_fills_one_axis_and_checks_sizes():
    mesh = make_mesh(data=-1, fsdp=1, tensor=1)
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="at most one mesh axis"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2, tensor=1)


def test_rules_map_weights_and_activations_to_distinct_mesh_axes():
    from flax import linen as nn

    spec = nn.logical_to_mesh_axes(("embed", "mlp"), DEFAULT_RULES)
    assert spec == PartitionSpec("fsdp", "tensor")
    act = nn.logical_to_mesh_axes(("batch", "length", "act_embed"), DEFAULT_RULES)
    assert act == PartitionSpec(("data", "fsdp"), None, None)


def test_sharded_forward_on_8_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_forward.py")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # q kernel [layers, D, N, H] = [2, 64, 4, 16]: embed over fsdp, heads over tensor.
    assert result["q_kernel_spec"] == ["None", "fsdp", "tensor", "None"]
    assert result["q_kernel_shard_shape"] == [2, 32, 2, 16]
    assert result["logits_max_diff"] < 1e-4
    assert result["latents_max_diff"] < 1e-4
