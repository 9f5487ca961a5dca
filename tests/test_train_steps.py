"""The three stage steps on the tiny config: the loss falls, frozen weights stay put and carry
no optimizer state, gradient accumulation matches one big batch, non-finite steps are skipped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.model import ModelConfig, init_params
from clara_jax.model.api import param_group
from clara_jax.model.sharding import make_mesh
from clara_jax.train.optimizer import trainable_groups
from clara_jax.train.state import create_state, init_query_adapter, state_shardings
from clara_jax.train.steps import (
    batch_fields,
    compile_train_step,
    make_loss_fn,
    make_train_step,
    rng_for_step,
)
from tests.train_support import SyntheticLoader


def _setup(config, cfg, stage, params=None):
    config = config.copy_and_resolve_references()
    config.train.stage = stage
    if params is None:
        params = init_params(cfg, jax.random.key(0))
        if stage == 3:
            params = init_query_adapter(params)
    state = create_state(config, params, stage)
    mesh = make_mesh()
    sh = state_shardings(cfg, mesh, state)
    step = make_train_step(config, cfg, stage, params)
    compiled, _ = compile_train_step(step, mesh, sh, jax.eval_shape(lambda s: s, state),
                                     batch_fields(config, stage))
    return config, jax.device_put(state, sh), compiled


def _overfit_config(tiny_config, **train):
    c = tiny_config.copy_and_resolve_references()
    c.train.learning_rate = 1e-2
    c.train.schedule = "constant"
    c.train.warmup_frac = 0.0
    for k, v in train.items():
        c.train[k] = v
    return c


def _check_frozen(before, state, stage, config):
    """Frozen leaves unchanged, every trainable group changed, moments only for trainable."""
    trainable = trainable_groups(config, stage)
    changed = set()
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before),
                                jax.tree.leaves(state.params)):
        group = param_group(path)
        if group not in trainable:
            np.testing.assert_array_equal(old, np.asarray(new), err_msg=str(path))
        elif not np.array_equal(old, np.asarray(new)):
            changed.add(group)
    assert changed == set(trainable), changed
    # Optimizer moments exist only for trainable leaves: mu and nu per leaf (+ scalar counts).
    n_train = sum(param_group(p) in trainable
                  for p, _ in jax.tree_util.tree_leaves_with_path(before))
    n_state = sum(np.ndim(x) > 0 for x in jax.tree.leaves(state.opt_state))
    assert n_state == 2 * n_train


@pytest.mark.parametrize("stage,extra", [(1, {}), (1, {"lambda_retrieval": 1.0}),
                                         (2, {"train_base": True}),
                                         (2, {"lambda_retrieval": 1.0}),
                                         (1, {"span_weight": 1.0}),
                                         (3, {"lambda_align": 0.5})])
def test_loss_falls_each_stage(tiny_config, tiny_cfg, stage, extra):
    config, state, step = _setup(_overfit_config(tiny_config, **extra), tiny_cfg, stage)
    before = jax.tree.map(np.asarray, state.params)
    batch = next(SyntheticLoader(config, stage, fixed=True))
    first = None
    for i in range(25):
        state, m = step(state, batch, rng_for_step(state.rng, i))
        first = m if first is None else first
    assert float(m["nonfinite"]) == 0.0
    assert float(m["ce"]) < float(first["ce"]) - 0.5, (first, m)
    if stage == 3:
        assert float(m["align"]) < float(first["align"])  # the retriever follows the generator
    if extra.get("lambda_retrieval"):  # questions move toward their own documents
        assert float(m["retrieval"]) < float(first["retrieval"]) - 0.5, (first, m)
    if extra.get("span_weight"):  # each latent comes to name its span's tokens in order
        assert float(m["span"]) < float(first["span"]) - 0.5, (first, m)
    _check_frozen(before, state, stage, config)


def test_span_warmup_trains_the_compressor_alone_first(tiny_config):
    # With a learned span head, the first train.span_warmup_steps steps train the span
    # read-out alone: the generator side does not move and its CE is not computed (NaN);
    # from then on the full stage-1 loss trains every group.
    config = _overfit_config(tiny_config, span_weight=1.0, span_warmup_steps=3)
    config.model.span_head = True
    cfg = ModelConfig.from_config(config)
    rate = int(config.data.compression_rate)
    params = init_params(cfg, jax.random.key(0))
    assert params["span_head"].shape == (rate, cfg.latent_width, cfg.vocab_size)
    assert param_group(jax.tree_util.tree_leaves_with_path(
        {"span_head": params["span_head"]})[0][0]) == "memory"
    config, state, step = _setup(config, cfg, 1, params)
    batch = next(SyntheticLoader(config, 1, fixed=True))
    before = jax.tree.map(np.asarray, state.params)
    spans = []
    for i in range(3):
        state, m = step(state, batch, rng_for_step(state.rng, i))
        assert np.isnan(float(m["ce"])) and float(m["target_tokens"]) == 0.0
        spans.append(float(m["span"]))
        np.testing.assert_allclose(float(m["loss"]), spans[-1], rtol=1e-6)
    assert spans[-1] < spans[0]
    np.testing.assert_array_equal(before["latent_up"]["kernel"],
                                  np.asarray(state.params["latent_up"]["kernel"]))
    assert not np.array_equal(before["span_head"], np.asarray(state.params["span_head"]))
    state, m = step(state, batch, rng_for_step(state.rng, 3))
    assert np.isfinite(float(m["ce"])) and float(m["target_tokens"]) > 0
    assert float(m["loss"]) > float(m["span"])  # CE + span
    assert not np.array_equal(before["latent_up"]["kernel"],
                              np.asarray(state.params["latent_up"]["kernel"]))


def test_grad_accum_matches_full_batch(tiny_config, tiny_cfg):
    # Every synthetic row has the same number of answer tokens, so the mean of microbatch
    # means equals the full-batch mean and the updates agree.
    base = _overfit_config(tiny_config)
    accum = _overfit_config(tiny_config, grad_accum=2)
    _, s1, step1 = _setup(base, tiny_cfg, 2)
    _, s2, step2 = _setup(accum, tiny_cfg, 2)
    loader = SyntheticLoader(base, 2)
    for i in range(3):
        batch = next(loader)
        s1, m1 = step1(s1, batch, rng_for_step(s1.rng, i))
        s2, m2 = step2(s2, batch, rng_for_step(s2.rng, i))
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    # Summation order differs between one batch and two microbatches, and AdamW divides each
    # gradient by its own running scale: an element whose gradient is near zero can take a
    # step of the other sign on rounding alone (at most lr a step), while a wrong accumulation
    # moves most elements by ~lr.
    lr, steps = float(base.train.learning_rate), 3
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        assert diff.max() <= 2 * lr * steps
        assert np.mean(diff > 2e-5) < 0.01


def test_nonfinite_step_is_skipped(tiny_config, tiny_cfg):
    params = init_params(tiny_cfg, jax.random.key(0))
    params["memory_embeddings"] = params["memory_embeddings"].at[0, 0].set(jnp.nan)
    config, state, step = _setup(_overfit_config(tiny_config), tiny_cfg, 1, params)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, m = step(state, next(SyntheticLoader(config, 1)), rng_for_step(state.rng, 0))
    assert float(m["nonfinite"]) == 1.0 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("stage", [2, 3])
def test_text_rows_mixed_with_latent_rows(tiny_config, tiny_cfg, stage):
    """data.text_share: rows with the documents' text in place of their slots train the
    generator beside latent rows; in stage 3 the alignment loss skips them (their generator read
    no latents), so a batch of text rows alone has none."""
    c = _overfit_config(tiny_config, **({"lambda_align": 0.5} if stage == 3 else {}))
    c.data.text_share = 0.5
    config, state, step = _setup(c, tiny_cfg, stage)
    batch = next(SyntheticLoader(config, stage, fixed=True))
    has_slots = batch["slot_mask"].any(axis=1)
    assert has_slots.any() and not has_slots.all()
    first = None
    for i in range(25):
        state, m = step(state, batch, rng_for_step(state.rng, i))
        assert all(np.isfinite(float(v)) for v in m.values()), m
        first = m if first is None else first
    assert float(m["nonfinite"]) == 0.0
    assert float(m["ce"]) < float(first["ce"]) - 0.5, (first, m)
    if stage == 3:
        assert float(m["align"]) < float(first["align"])
        c.data.text_share = 1.0
        config, state, step = _setup(c, tiny_cfg, stage)
        batch = next(SyntheticLoader(config, stage, fixed=True))
        assert not batch["slot_mask"].any()
        state, m = step(state, batch, rng_for_step(state.rng, 0))
        assert float(m["align"]) == 0.0 and np.isfinite(float(m["loss"]))
        assert float(m["nonfinite"]) == 0.0


def test_chunk_write_and_copy_path_train_in_stage_1(tiny_config):
    # model.chunk_write (the compressor side) and model.latent_copy (the generator side) train
    # with the stage-1 loss, which their outputs lower on a fixed batch.
    config = _overfit_config(tiny_config, span_weight=1.0)
    config.model.span_head = True
    config.model.chunk_write = True
    config.model.latent_copy = True
    config.model.latent_positions = "spread"
    cfg = ModelConfig.from_config(config)
    params = init_params(cfg, jax.random.key(0))
    groups = {param_group(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        {k: v for k, v in params.items() if k.startswith("copy_") or k == "chunk_write"})}
    assert groups == {"latent_up", "memory"}
    config, state, step = _setup(config, cfg, 1, params)
    batch = next(SyntheticLoader(config, 1, fixed=True))
    before = jax.tree.map(np.asarray, state.params)
    losses = []
    for i in range(4):
        state, m = step(state, batch, rng_for_step(state.rng, i))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    for name in ("chunk_write", "copy_query", "copy_key", "copy_subpos", "copy_gate"):
        assert not np.array_equal(before[name], np.asarray(state.params[name])), name


def test_pointer_loss_reaches_the_pointer_through_a_shut_gate(tiny_config):
    # train.pointer_weight: the copy path's own answer CE. With the gate open it is the answer
    # CE itself; with the gate shut the answer CE passes the pointer no gradient, the pointer
    # loss does, and it leaves the span read-outs it points at to the span loss.
    config = _overfit_config(tiny_config, span_weight=1.0)
    config.model.span_head = True
    config.model.latent_copy = True
    cfg = ModelConfig.from_config(config)
    params = init_params(cfg, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in next(SyntheticLoader(config, 1, fixed=True)).items()}

    def loss_and_grads(weight, gate_bias):
        c = config.copy_and_resolve_references()
        c.train.pointer_weight = weight
        p = dict(params, copy_gate_bias=jnp.full_like(params["copy_gate_bias"], gate_bias))
        loss_fn = make_loss_fn(c, cfg, 1)
        names = ("copy_query", "span_head")
        return jax.jit(jax.value_and_grad(
            lambda sub: loss_fn({**p, **sub}, batch, None), has_aux=True))(
                {k: p[k] for k in names})

    (_, m), _ = loss_and_grads(1.0, 30.0)
    np.testing.assert_allclose(float(m["pointer"]), float(m["ce"]), rtol=1e-4)
    (_, m), shut = loss_and_grads(0.0, -30.0)
    assert "pointer" not in m and float(jnp.abs(shut["copy_query"]).max()) < 1e-9
    (_, m), pointed = loss_and_grads(1.0, -30.0)
    assert np.isfinite(float(m["pointer"]))
    assert float(jnp.abs(pointed["copy_query"]).max()) > 1e-4
    np.testing.assert_allclose(pointed["span_head"], shut["span_head"], atol=1e-7)
