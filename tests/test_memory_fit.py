"""What makes the 7B config fit its chips, on the tiny model: the frozen base stored in
bfloat16 (`model.base_dtype`) through init, training, checkpoints and the partition; LoRA
factors and their Adam moments sharded over fsdp; and remat='projections', which saves
less than 'dots_no_batch' and computes the same gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from clara_jax.config import ConfigError, finalize
from clara_jax.model import ModelConfig, abstract_params, init_params, logical_specs
from clara_jax.model import sharding as sh
from clara_jax.model.api import param_group
from clara_jax.model.sharding import make_mesh
from clara_jax.train import checkpoint as ckpt
from clara_jax.train.optimizer import trainable_groups
from clara_jax.train.state import abstract_state, create_state, state_shardings
from clara_jax.train.steps import batch_fields, compile_train_step, make_train_step, rng_for_step
from tests.conftest import REPO, xla_flags
from tests.train_support import SyntheticLoader

STAGE = 2


def _config(tiny_config, **model):
    c = tiny_config.copy_and_resolve_references()
    c.train.stage = STAGE
    c.train.learning_rate = 3e-3
    for k, v in model.items():
        c.model[k] = v
    return finalize(c)


def _dtypes_by_group(params) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        out.setdefault(param_group(path).split(":")[0], set()).add(str(leaf.dtype))
    return out


def _train(config, steps: int):
    """(final state, per-step losses) of `steps` stage-2 steps from seed 0 on fixed batches."""
    cfg = ModelConfig.from_config(config)
    state = create_state(config, init_params(cfg, jax.random.key(0)), STAGE)
    mesh = make_mesh()
    shardings = state_shardings(cfg, mesh, state)
    compiled, _ = compile_train_step(make_train_step(config, cfg, STAGE, state.params), mesh,
                                     shardings, jax.eval_shape(lambda s: s, state),
                                     batch_fields(config, STAGE))
    state = jax.device_put(state, shardings)
    loader = SyntheticLoader(config, STAGE)
    losses = []
    for i in range(steps):
        state, m = compiled(state, next(loader), rng_for_step(state.rng, i))
        losses.append(float(m["loss"]))
    return state, losses


def test_bfloat16_base_is_the_float32_base_rounded(tiny_config):
    f32 = ModelConfig.from_config(_config(tiny_config))
    bf16 = ModelConfig.from_config(_config(tiny_config, base_dtype="bfloat16"))
    assert _dtypes_by_group(abstract_params(bf16)) == {
        "base": {"bfloat16"}, "adapter": {"float32"}, "memory": {"float32"},
        "latent_up": {"float32"}}
    a, b = init_params(f32, jax.random.key(3)), init_params(bf16, jax.random.key(3))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        want = x.astype(y.dtype)  # the same seed gives the same model, rounded
        np.testing.assert_array_equal(np.asarray(want), np.asarray(y), err_msg=str(path))


def test_bfloat16_base_trains_like_float32(tiny_config):
    f32_state, f32_losses = _train(_config(tiny_config), 3)
    config = _config(tiny_config, base_dtype="bfloat16")
    state, losses = _train(config, 3)
    assert _dtypes_by_group(state.params)["base"] == {"bfloat16"}
    assert _dtypes_by_group(state.params)["adapter"] == {"float32"}
    # Moments only for the trainable leaves, all float32 (none for the bfloat16 base).
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    n_train = sum(param_group(p) in trainable_groups(config, STAGE)
                  for p, _ in jax.tree_util.tree_leaves_with_path(state.params))
    assert len(moments) == 2 * n_train and {str(m.dtype) for m in moments} == {"float32"}
    assert all(np.isfinite(losses))
    # The base's rounding moves the loss by a fraction of a percent, far less than 3 steps
    # of training move it (the second check keeps the first from passing on a frozen run).
    np.testing.assert_allclose(losses, f32_losses, rtol=2e-2)
    assert abs(f32_losses[-1] - f32_losses[0]) > 10 * abs(losses[-1] - f32_losses[-1])
    # The frozen base did not move: it is the init's, rounded, after the steps too.
    start = init_params(ModelConfig.from_config(config), jax.random.key(0))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(start),
                            jax.tree.leaves(state.params)):
        if param_group(path) == "base":
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_checkpoint_keeps_the_bfloat16_base(tiny_config, tmp_path):
    config = _config(tiny_config, base_dtype="bfloat16")
    cfg = ModelConfig.from_config(config)
    state = create_state(config, init_params(cfg, jax.random.key(1)), STAGE)
    manager = ckpt.make_manager(tmp_path, async_save=False)
    ckpt.save(manager, state, {}, {"stage": STAGE, "config": config.to_json()})
    abstract = abstract_state(config, cfg, STAGE)
    restored, _, _ = ckpt.restore(manager, abstract, state_shardings(cfg, make_mesh(), abstract))
    manager.close()
    assert _dtypes_by_group(restored.params)["base"] == {"bfloat16"}
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_trained_base_must_be_float32(tiny_config):
    c = tiny_config.copy_and_resolve_references()
    c.model.base_dtype = "bfloat16"
    c.train.train_base = True
    with pytest.raises(ConfigError, match=r"config\.model\.base_dtype='bfloat16'.*train_base"):
        finalize(c)
    # Runs that turn base training on themselves (the demo's stages 1-2, pretraining) are
    # stopped where the trainable groups are chosen.
    c.train.train_base = False
    finalize(c)
    c.train.train_base = True
    with pytest.raises(ConfigError, match=r"model\.base_dtype"):
        trainable_groups(c, 1)
    c.model.base_dtype = "float16"
    c.train.train_base = False
    with pytest.raises(ConfigError, match=r"config\.model\.base_dtype='float16'"):
        finalize(c)


def test_mistral_config_stores_its_base_in_bfloat16():
    from configs import mistral_7b

    config = mistral_7b.get_config()
    cfg = ModelConfig.from_config(config)
    assert cfg.base_dtype == "bfloat16" and cfg.dtype == "bfloat16"
    assert cfg.remat == "full"
    groups = _dtypes_by_group(abstract_params(cfg))
    assert groups["base"] == {"bfloat16"} and groups["adapter"] == {"float32"}


def test_lora_factors_have_an_fsdp_axis(tiny_cfg):
    """Every LoRA factor has an axis the rules put on fsdp (with tensor=1 the heads and mlp
    axes are whole, so a factor named like its kernel had none on one side)."""
    specs = logical_specs(tiny_cfg)
    mesh = AbstractMesh((1, 8, 1), sh.MESH_AXES)
    for path, spec in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        if not param_group(path).startswith("adapter"):
            continue
        assert sh.LORA_RANK in spec, path
        assert any(sh.mesh_size(n, mesh) == 8 for n in spec if n), (path, spec)


def test_a_lora_axis_the_mesh_does_not_divide_stays_whole(tiny_config):
    """head_dim 12 over fsdp=8 cannot be split evenly (jax refuses): that axis of the LoRA
    factors falls back to whole; mlp 128 still splits, and the kernels are untouched."""
    cfg = ModelConfig.from_config(_config(tiny_config, head_dim=12))
    mesh = AbstractMesh((1, 8, 1), sh.MESH_AXES)
    fitted = sh.fit_specs(logical_specs(cfg), abstract_params(cfg), mesh)
    q = fitted["decoder"]["layers_0"]["attn"]["q"]
    o = fitted["decoder"]["layers_0"]["attn"]["o"]
    up = fitted["decoder"]["layers_0"]["mlp"]["up"]
    assert tuple(q["lora_generator_b"]) == (sh.LORA_RANK, sh.HEADS, None)
    assert tuple(o["lora_generator_a"]) == (sh.HEADS, None, sh.LORA_RANK)
    assert tuple(up["lora_generator_b"]) == (sh.LORA_RANK, sh.LORA_MLP)
    assert tuple(q["kernel"]) == (sh.EMBED, sh.HEADS, sh.HEAD_DIM)


def test_lora_and_moments_shard_over_fsdp_on_8_devices():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_lora.py")],
                         env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["lora_leaves"] > 0 and r["replicated_lora"] == []
    assert r["moment_leaves"] == 2 * r["trainable_lora_leaves"] and r["replicated_moments"] == []
    # Each device holds 1/8 of every factor and of its moments.
    assert r["lora_bytes_per_device"] * 8 == r["lora_bytes_total"]
    assert r["moment_bytes_per_device"] * 8 == r["moment_bytes_total"]
    assert r["base_dtypes"] == ["bfloat16"]
    assert all(np.isfinite(r["losses"])) and len(r["losses"]) == 2
    assert r["sharding_mismatches"] == []


def _grads(loss_fn, params, batch):
    return jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(5))[0]))(params)


def test_projections_policy_gives_the_same_gradients(tiny_config):
    """remat='projections' only changes what the backward recomputes."""
    from clara_jax.train.steps import make_loss_fn

    grads, params = {}, None
    for policy in ("none", "projections"):
        config = _config(tiny_config, remat=policy, scan_layers=True)
        config.model.lora.dropout = 0.1  # the adapters run as separate matmuls
        cfg = ModelConfig.from_config(config)
        if params is None:  # remat changes no param: one init (one compile) for both
            params = init_params(cfg, jax.random.key(0))
            # B = 0 at init would hide the adapter's path in the backward; make it nonzero.
            params = jax.tree_util.tree_map_with_path(
                lambda p, x: x + 0.01 if str(getattr(p[-1], "key", "")).endswith("_b") else x,
                params)
        assert jax.tree.leaves(abstract_params(cfg)) == [
            jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves(params)]
        batch = next(SyntheticLoader(config, STAGE))
        grads[policy] = _grads(make_loss_fn(config, cfg, STAGE), params, batch)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads["none"]),
                            jax.tree.leaves(grads["projections"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads["none"]))
