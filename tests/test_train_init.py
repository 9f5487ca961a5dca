"""Starting points of a run: Hugging Face weights (`--init_from_hf`) must match the config's
architecture, and the stage-3 query adapter starts as a copy of the compressor adapter."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from clara_jax.config import finalize
from clara_jax.model import ModelConfig, init_params, logical_specs
from clara_jax.model.sharding import logical_to_shardings, make_mesh
from clara_jax.train.loop import _hf_params
from clara_jax.train.state import init_query_adapter

from .conftest import REPO

LLAMA = REPO / "tests" / "fixtures" / "hf" / "llama"


def _llama_config(tiny_config):
    c = tiny_config.copy_and_resolve_references()
    m = c.model
    m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads = 128, 32, 2, 4, 2
    m.head_dim, m.mlp_dim, m.rope_theta, m.latent_dim = 8, 64, 500000.0, 16
    return finalize(c)


def test_init_from_hf_loads_the_checkpoint(tiny_config):
    from clara_jax.convert import hf

    config = _llama_config(tiny_config)
    cfg = ModelConfig.from_config(config)
    sh = logical_to_shardings(logical_specs(cfg), make_mesh())
    params = _hf_params(config, str(LLAMA), cfg, sh)
    _, ref = hf.load(LLAMA, progress=False,
                     **{f: getattr(cfg, f) for f in hf.OVERRIDABLE})
    np.testing.assert_array_equal(np.asarray(params["decoder"]["embedding"]),
                                  np.asarray(ref["decoder"]["embedding"]))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(cfg, jax.random.key(0)))


def test_init_from_hf_names_mismatched_fields(tiny_config, tiny_cfg):
    sh = logical_to_shardings(logical_specs(tiny_cfg), make_mesh())
    with pytest.raises(ValueError, match=r"--config.model.dim=32.*--config.model.rope_theta"):
        _hf_params(tiny_config, str(LLAMA), tiny_cfg, sh)


def test_query_adapter_copied_from_compressor(tiny_params):
    out = init_query_adapter(tiny_params)
    q = out["decoder"]["layers_0"]["attn"]["q"]
    np.testing.assert_array_equal(np.asarray(q["lora_query_a"]),
                                  np.asarray(q["lora_compressor_a"]))
    assert q["lora_query_a"] is not q["lora_compressor_a"]  # a copy: donation-safe
    np.testing.assert_array_equal(np.asarray(out["decoder"]["layers_0"]["attn"]["q"]["kernel"]),
                                  np.asarray(tiny_params["decoder"]["layers_0"]["attn"]["q"]
                                             ["kernel"]))


def test_init_from_hf_accepts_a_converted_bundle(tiny_config, tmp_path):
    from clara_jax.convert import bundle, hf

    config = _llama_config(tiny_config)
    cfg = ModelConfig.from_config(config)
    overrides = {f: getattr(cfg, f) for f in hf.OVERRIDABLE}
    bundle.from_hf(LLAMA, tmp_path / "b", tokenizer=False, param_dtype="bfloat16",
                   progress=False, **overrides)
    sh = logical_to_shardings(logical_specs(cfg), make_mesh())
    params = _hf_params(config, str(tmp_path / "b"), cfg, sh)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    _, ref = hf.load(LLAMA, progress=False, **overrides)
    np.testing.assert_allclose(np.asarray(params["decoder"]["embedding"]),
                               np.asarray(ref["decoder"]["embedding"]), rtol=1e-2, atol=1e-3)


def test_init_from_hf_takes_the_runs_latent_layout(tiny_config, tmp_path):
    """Spread latent slots, the sub-position code and interleaved memory tokens shape no
    parameter, and a Hugging Face checkpoint has no compressor yet: it starts such a run with
    the same params as a run without them. A converted bundle keeps the layout it records
    (a from-clara bundle's compressor was trained with it): the refusal names the flags."""
    from clara_jax.convert import bundle, hf

    plain = _llama_config(tiny_config)
    c = plain.copy_and_resolve_references()
    c.model.latent_positions, c.model.span_code, c.model.memory_layout = (
        "spread", 0.02, "interleave")
    config = finalize(c)
    cfg = ModelConfig.from_config(config)
    assert cfg.latent_span > 1 and cfg.span_code_period > 1
    plain_cfg = ModelConfig.from_config(plain)
    sh = logical_to_shardings(logical_specs(cfg), make_mesh())
    ref = _hf_params(plain, str(LLAMA), plain_cfg, sh)
    params = _hf_params(config, str(LLAMA), cfg, sh)
    for (path, x), r in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(r), err_msg=str(path))

    bundle.from_hf(LLAMA, tmp_path / "b", tokenizer=False, param_dtype="float32",
                   progress=False, **{f: getattr(plain_cfg, f) for f in hf.OVERRIDABLE})
    with pytest.raises(ValueError) as e:
        _hf_params(config, str(tmp_path / "b"), cfg, sh)
    assert str(e.value).endswith(
        "set --config.model.memory_layout='append' --config.model.latent_positions='packed' "
        "--config.model.span_code=0.0")


def test_init_from_hf_keeps_a_bfloat16_base(tiny_config, tmp_path):
    """A bfloat16-base run starts from float32 weights (a checkpoint directory or a float32
    bundle) with its base rounded to bfloat16 and the rest float32."""
    from clara_jax.convert import bundle, hf
    from clara_jax.model import param_group

    c = _llama_config(tiny_config)
    c.model.base_dtype = "bfloat16"
    config = finalize(c)
    cfg = ModelConfig.from_config(config)
    overrides = {f: getattr(cfg, f) for f in hf.OVERRIDABLE}
    bundle.from_hf(LLAMA, tmp_path / "b", tokenizer=False, param_dtype="float32",
                   progress=False, **overrides)
    sh = logical_to_shardings(logical_specs(cfg), make_mesh())
    _, ref = hf.load(LLAMA, progress=False, **{**overrides, "base_dtype": "float32"})
    for src in (str(LLAMA), str(tmp_path / "b")):
        params = _hf_params(config, src, cfg, sh)
        for (path, x), r in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(ref)):
            base = param_group(path) == "base"
            assert x.dtype == (np.dtype("bfloat16") if base else np.float32), (src, path)
            if base:
                np.testing.assert_array_equal(np.asarray(x),
                                              np.asarray(r.astype(x.dtype)), err_msg=str(path))


def test_checkpoint_of_another_model_is_named_field_by_field(tiny_config):
    """Resuming or --init_from a run of another model shape fails with the differing fields,
    not orbax's tree mismatch; fields that do not shape the parameters may differ."""
    from clara_jax.train.checkpoint import CheckpointError, check_model

    meta = {"config": tiny_config.to_json()}
    same = tiny_config.copy_and_resolve_references()
    same.model.dtype = "bfloat16"
    same.model.lora.dropout = 0.1  # tiny has 0.0
    check_model(meta, same, "W/checkpoints")
    other = tiny_config.copy_and_resolve_references()
    other.model.dim = tiny_config.model.dim * 2
    other.model.n_layers = tiny_config.model.n_layers + 1
    with pytest.raises(CheckpointError) as err:
        check_model(meta, other, "W/checkpoints")
    msg = str(err.value)
    assert msg.startswith("W/checkpoints holds a run of another model: ")
    assert f"model.dim={tiny_config.model.dim}, model.n_layers={tiny_config.model.n_layers};" \
        in msg
    assert f"this config has model.dim={other.model.dim}, model.n_layers={other.model.n_layers}" \
        in msg
