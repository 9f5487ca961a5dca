"""The decoder, LoRA adapters and CLaRa module: shapes, causality, adapters, gradients,
KV cache, layer scan/remat and parameter counts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from clara_jax.model import (
    ModelConfig,
    abstract_params,
    compress,
    count_params,
    decode,
    encode_query,
    fit_optional_params,
    forward_logits,
    generate_logits,
    init_cache,
    init_params,
    logical_specs,
)
from clara_jax.model.partition import STAGE_TRAINABLE, param_labels, partition
from configs import mistral_7b

ADAPTERS = ("compressor", "query", "generator")

# Compiled once per shape: eager op-by-op dispatch is what makes model tests slow on a CPU.
decode = jax.jit(decode, static_argnums=0, static_argnames=("adapter", "last_logits_only"))
compress = jax.jit(compress, static_argnums=0, static_argnames="with_means")
generate_logits = jax.jit(generate_logits, static_argnums=0)


def _tokens(cfg, b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 1, cfg.vocab_size, jnp.int32)


def _with_adapter_b(params, adapter, scale=0.05, seed=3):
    """A copy of params whose `adapter` B matrices are random (as after training)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = getattr(path[-1], "key", "")
        if name == f"lora_{adapter}_b":
            leaf = scale * jax.random.normal(key, leaf.shape)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def test_public_functions_shapes_and_dtypes(tiny_cfg, tiny_params):
    cfg, p = tiny_cfg, tiny_params
    b, t, m, lw = 3, 11, cfg.num_memory_tokens, cfg.latent_width
    toks = _tokens(cfg, b, t)
    mask = jnp.ones((b, t), bool)
    logits = forward_logits(cfg, p, toks)
    assert logits.shape == (b, t, cfg.vocab_size) and logits.dtype == jnp.float32
    lat = compress(cfg, p, toks, mask)
    assert lat.shape == (b, m, lw) and lat.dtype == jnp.float32
    assert lw == 32 < cfg.dim  # the tiny config projects latents
    lat, doc_mean, mem_mean = compress(cfg, p, toks, mask, with_means=True)
    assert doc_mean.shape == mem_mean.shape == (b, cfg.dim)
    assert encode_query(cfg, p, toks, mask).shape == (b, m, lw)
    k = 2
    gen_t = k * (m + 1) + 5
    slot = (jnp.arange(gen_t) % (m + 1) < m) & (jnp.arange(gen_t) < k * (m + 1))
    slot_mask = jnp.broadcast_to(slot, (b, gen_t))
    latents = jnp.stack([lat, lat], axis=1)
    glogits, cache = generate_logits(cfg, p, _tokens(cfg, b, gen_t), jnp.ones((b, gen_t), bool),
                                     slot_mask, latents)
    assert glogits.shape == (b, gen_t, cfg.vocab_size) and glogits.dtype == jnp.float32
    assert cache is None
    cache = init_cache(cfg, b, 16)
    assert cache["k"].shape == (cfg.n_layers, b, 16, cfg.n_kv_heads, cfg.head_dim)
    step_logits, cache = decode(cfg, p, toks[:, :4], cache=cache)
    assert step_logits.shape == (b, 4, cfg.vocab_size) and int(cache["index"]) == 4


def test_full_width_latents_without_projection(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, latent_dim=0)
    p = init_params(cfg, jax.random.key(0))
    assert "latent_down" not in p and "latent_up" not in p
    lat = compress(cfg, p, _tokens(cfg, 2, 7), jnp.ones((2, 7), bool))
    assert lat.shape == (2, cfg.num_memory_tokens, cfg.dim)


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_future_token_never_changes_earlier_logits(tiny_cfg, tiny_params, adapter):
    params = tiny_params if adapter is None else _with_adapter_b(tiny_params, adapter)
    toks = _tokens(tiny_cfg, 2, 12)
    changed = toks.at[:, 7:].set((toks[:, 7:] + 17) % tiny_cfg.vocab_size)
    a, _ = decode(tiny_cfg, params, toks, adapter=adapter)
    b, _ = decode(tiny_cfg, params, changed, adapter=adapter)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_right_padding_leaves_valid_positions_unchanged(tiny_cfg, tiny_params):
    toks = _tokens(tiny_cfg, 1, 6)
    padded = jnp.concatenate([toks, jnp.zeros((1, 4), jnp.int32)], axis=1)
    mask = jnp.arange(10)[None] < 6
    a, _ = decode(tiny_cfg, tiny_params, toks)
    b, _ = decode(tiny_cfg, tiny_params, padded, mask)
    np.testing.assert_allclose(a, b[:, :6], atol=1e-5)


def test_left_padding_gives_the_same_logits(tiny_cfg, tiny_params):
    toks = _tokens(tiny_cfg, 1, 6)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), toks], axis=1)
    mask = jnp.arange(9)[None] >= 3
    a, _ = decode(tiny_cfg, tiny_params, toks)
    b, _ = decode(tiny_cfg, tiny_params, padded, mask)
    np.testing.assert_allclose(a, b[:, 3:], atol=1e-5)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_fresh_adapter_equals_base_model(tiny_cfg, tiny_params, adapter):
    toks = _tokens(tiny_cfg, 2, 9)
    base, _ = decode(tiny_cfg, tiny_params, toks)
    with_adapter, _ = decode(tiny_cfg, tiny_params, toks, adapter=adapter)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(with_adapter))


@pytest.mark.parametrize("trained", ADAPTERS)
def test_switching_adapters_changes_only_its_own_path(tiny_cfg, tiny_params, trained):
    params = _with_adapter_b(tiny_params, trained)
    toks = _tokens(tiny_cfg, 2, 9)
    base, _ = decode(tiny_cfg, tiny_params, toks)
    for adapter in (None, *ADAPTERS):
        out, _ = decode(tiny_cfg, params, toks, adapter=adapter)
        if adapter == trained:
            assert float(jnp.max(jnp.abs(out - base))) > 1e-3
        else:
            np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_unknown_adapter_is_refused(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="unknown adapter 'retriever'"):
        decode(tiny_cfg, tiny_params, _tokens(tiny_cfg, 1, 3), adapter="retriever")


def test_lora_dropout_is_active_only_with_an_rng(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, lora_dropout=0.5)
    params = _with_adapter_b(init_params(cfg, jax.random.key(0)), "generator")
    toks = _tokens(cfg, 2, 6)
    a, _ = decode(cfg, params, toks, adapter="generator")
    b, _ = decode(cfg, params, toks, adapter="generator")
    c, _ = decode(cfg, params, toks, adapter="generator", rng=jax.random.key(1))
    d, _ = decode(cfg, params, toks, adapter="generator", rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    assert not np.allclose(a, c)


@pytest.mark.parametrize("kernels_train", [False, True])
@pytest.mark.parametrize("in_shape,out_shape", [((8,), (3, 4)), ((3, 4), (8,))])
def test_folded_adapter_matches_the_lora_formula_and_its_gradients(tiny_cfg, in_shape,
                                                                     out_shape, kernels_train):
    """Without dropout the adapter is folded into the kernel with a hand-written backward
    (adapter gradients through thin matmuls, or from the kernel's gradient when the kernel
    trains): values and gradients (x, W, A, B) must equal those of x·W + s·(x·A)·B."""
    import dataclasses

    from clara_jax.model.layers import LoRALinear

    n_in = len(in_shape)
    cfg = dataclasses.replace(tiny_cfg, kernels_train=kernels_train)
    layer = LoRALinear(in_shape, out_shape, ("a",) * n_in, ("b",) * len(out_shape), cfg)
    x = jax.random.normal(jax.random.key(0), (2, 5) + in_shape)
    p = nn.unbox(layer.init(jax.random.key(1), x, "query"))["params"]
    p["lora_query_b"] = 0.5 * jax.random.normal(jax.random.key(3), p["lora_query_b"].shape)
    w = jax.random.normal(jax.random.key(2), (2, 5) + out_shape)
    axes = (tuple(range(2, 2 + n_in)), tuple(range(n_in)))

    def reference(p, x):
        a, b = p["lora_query_a"], p["lora_query_b"]
        y = jnp.tensordot(x, p["kernel"], axes)
        return y + jnp.tensordot(jnp.tensordot(x, a, axes), b, 1) * tiny_cfg.lora_scale

    def folded(p, x):
        return layer.apply({"params": p}, x, "query")

    np.testing.assert_allclose(folded(p, x), reference(p, x), rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda p, x: jnp.vdot(folded(p, x), w), argnums=(0, 1))(p, x)
    want = jax.grad(lambda p, x: jnp.vdot(reference(p, x), w), argnums=(0, 1))(p, x)
    for name in ("kernel", "lora_query_a", "lora_query_b"):
        np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got[0]["lora_query_a"]).max()) > 0
    assert float(jnp.abs(got[0]["lora_compressor_b"]).max()) == 0


def test_attention_core_matches_autodiff_of_the_softmax_formula():
    """The hand-written attention backward gives autodiff's gradients of
    softmax(q·kᵀ masked)·v, including a query row whose keys are all masked."""
    from clara_jax.model.layers import _scores, attention_core

    def reference(qh, kh, vh, mask):
        b, g, rt, _ = qh.shape
        s = _scores(qh, kh, mask)
        w = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True)))
        w = w.reshape(b, g, rt, -1)
        return jnp.einsum("bgqs,bgsh->bgqh", w, vh) / jnp.sum(w, -1, keepdims=True)

    keys = jax.random.split(jax.random.key(0), 5)
    b, g, r, t, s, h = 2, 2, 3, 5, 7, 4
    qh = jax.random.normal(keys[0], (b, g, r * t, h))
    kh = jax.random.normal(keys[1], (b, g, s, h))
    vh = jax.random.normal(keys[2], (b, g, s, h))
    mask = jax.random.bernoulli(keys[3], 0.6, (b, t, s)).at[0, 1].set(False)
    w = jax.random.normal(keys[4], qh.shape)
    np.testing.assert_allclose(attention_core(qh, kh, vh, mask), reference(qh, kh, vh, mask),
                               rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda *a: jnp.vdot(attention_core(*a, mask), w), argnums=(0, 1, 2))(
        qh, kh, vh)
    want = jax.grad(lambda *a: jnp.vdot(reference(*a, mask), w), argnums=(0, 1, 2))(qh, kh, vh)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got[0][0, :, 1::t]).max()) == 0.0  # the fully masked query row


def test_bfloat16_dense_gradients_follow_float32():
    """The bfloat16 dense path (float32 accumulation, gathered transposes on CPU) gives the
    float32 values and gradients to bfloat16 precision."""
    from clara_jax.model.layers import _transposed, dense

    x, w, c = (jax.random.normal(k, s) for k, s in
               zip(jax.random.split(jax.random.key(0), 3), [(24, 16), (16, 40), (24, 40)]))
    bf = jnp.bfloat16
    np.testing.assert_array_equal(_transposed(w.astype(bf)), w.astype(bf).T)

    def loss(x, w, dtype):
        return jnp.vdot(dense(x.astype(dtype), w.astype(dtype), jnp.float32), c)

    want = jax.grad(loss, argnums=(0, 1))(x, w, jnp.float32)
    got = jax.grad(loss, argnums=(0, 1))(x, w, bf)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), e, rtol=0.05, atol=0.1)


def test_swiglu_backward_matches_autodiff():
    from clara_jax.model.layers import swiglu

    gate, up, w = jax.random.normal(jax.random.key(0), (3, 4, 7)) * 3.0
    np.testing.assert_allclose(swiglu(gate, up), jax.nn.silu(gate) * up, rtol=1e-6)
    got = jax.grad(lambda a, b: jnp.vdot(swiglu(a, b), w), argnums=(0, 1))(gate, up)
    want = jax.grad(lambda a, b: jnp.vdot(jax.nn.silu(a) * b, w), argnums=(0, 1))(gate, up)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def _rag_loss(cfg, params, docs, tokens):
    """Compress K=1 documents, generate over their latents: a stage-1-shaped loss."""
    b, t = tokens.shape
    m = cfg.num_memory_tokens
    lat = compress(cfg, params, docs, jnp.ones(docs.shape, bool))
    slot_mask = jnp.broadcast_to(jnp.arange(t) < m, (b, t))
    logits, _ = generate_logits(cfg, params, tokens, jnp.ones((b, t), bool), slot_mask,
                                lat[:, None])
    logp = jax.nn.log_softmax(logits[:, m:-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, m + 1:, None], -1))


def _group_norms(params, grads):
    from clara_jax.model import param_group

    norms = {}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        norms[param_group(path)] = norms.get(param_group(path), 0.0) + float(jnp.sum(g * g))
    return norms


def test_gradients_reach_adapters_and_memory_and_optimizer_never_moves_base(tiny_cfg):
    cfg = tiny_cfg
    # Non-zero B everywhere so that gradients reach every A as well.
    params = init_params(cfg, jax.random.key(0))
    for a in ADAPTERS:
        params = _with_adapter_b(params, a, seed=len(a))
    docs, toks = _tokens(cfg, 2, 10), _tokens(cfg, 2, cfg.num_memory_tokens + 8, seed=2)
    grads = jax.jit(jax.grad(lambda p: _rag_loss(cfg, p, docs, toks)))(params)
    norms = _group_norms(params, grads)
    for group in ("adapter:compressor", "adapter:generator", "memory", "latent_up"):
        assert norms[group] > 0, group
    assert norms["adapter:query"] == 0.0  # not on the path

    trainable = STAGE_TRAINABLE[1]
    tx = partition(optax.adam(1e-2), params, trainable)
    state = tx.init(params)
    labels = param_labels(params, trainable)
    # Frozen leaves carry no optimizer state: the state holds only trainable-sized moments.
    n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim)
    n_trainable = sum(x.size for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
                      if lab == "trainable")
    assert n_state == 2 * n_trainable
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for (path, old), nw, lab in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(new), jax.tree.leaves(labels)):
        if lab == "frozen":
            np.testing.assert_array_equal(np.asarray(old), np.asarray(nw), err_msg=str(path))
    assert not np.array_equal(params["memory_embeddings"], new["memory_embeddings"])


def test_kv_cache_decoding_equals_full_forward(tiny_cfg, tiny_params):
    cfg, p = tiny_cfg, _with_adapter_b(tiny_params, "generator")
    toks = _tokens(cfg, 2, 12)
    full, _ = decode(cfg, p, toks, adapter="generator")
    cache = init_cache(cfg, 2, 16)
    pre, cache = decode(cfg, p, toks[:, :5], cache=cache, adapter="generator")
    steps = [pre]
    for i in range(5, 12):
        out, cache = decode(cfg, p, toks[:, i:i + 1], cache=cache, adapter="generator")
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_last_logits_only_is_the_last_position(tiny_cfg, tiny_params):
    toks = _tokens(tiny_cfg, 2, 7)
    full, _ = decode(tiny_cfg, tiny_params, toks)
    last, _ = decode(tiny_cfg, tiny_params, toks, last_logits_only=True)
    assert last.shape == (2, 1, tiny_cfg.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_kv_cache_with_left_padded_prompts_and_latent_prefill(tiny_cfg, tiny_params):
    cfg, p = tiny_cfg, _with_adapter_b(tiny_params, "generator")
    m = cfg.num_memory_tokens
    lat = compress(cfg, p, _tokens(cfg, 2, 8), jnp.ones((2, 8), bool))[:, None]
    toks = _tokens(cfg, 2, m + 7, seed=5)
    slot = jnp.broadcast_to(jnp.arange(m + 7) < m, (2, m + 7))
    full, _ = generate_logits(cfg, p, toks, jnp.ones((2, m + 7), bool), slot, lat)
    # Row 1 gets 2 pads on the left; every row's prompt ends at the same cache index.
    pad = 2
    ptoks = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), toks], axis=1)
    pmask = jnp.concatenate([jnp.zeros((2, pad), bool), jnp.ones((2, m + 7), bool)], axis=1)
    pslot = jnp.concatenate([jnp.zeros((2, pad), bool), slot], axis=1)
    cache = init_cache(cfg, 2, pad + m + 7)
    split = pad + m + 3
    pre, cache = generate_logits(cfg, p, ptoks[:, :split], pmask[:, :split], pslot[:, :split],
                                 lat, cache=cache)
    outs = [pre[:, pad:]]
    for i in range(split, pad + m + 7):
        out, cache = generate_logits(cfg, p, ptoks[:, i:i + 1], pmask[:, i:i + 1],
                                     pslot[:, i:i + 1], lat, cache=cache)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)


def _stack_layers(params, n):
    dec = dict(params["decoder"])
    layers = [dec.pop(f"layers_{i}") for i in range(n)]
    dec["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return {**params, "decoder": dec}


@pytest.mark.parametrize("remat", ["none", "full", "dots_no_batch", "projections"])
def test_scan_over_layers_and_remat_match_the_loop(tiny_cfg, tiny_params, remat):
    scfg = dataclasses.replace(tiny_cfg, scan_layers=True, remat=remat)
    sparams = _stack_layers(_with_adapter_b(tiny_params, "compressor"), tiny_cfg.n_layers)
    assert jax.tree.structure(sparams) == jax.tree.structure(abstract_params(scfg))
    docs = _tokens(tiny_cfg, 2, 10)
    mask = jnp.ones((2, 10), bool)
    loop = compress(tiny_cfg, _with_adapter_b(tiny_params, "compressor"), docs, mask)
    scan = compress(scfg, sparams, docs, mask)
    np.testing.assert_allclose(loop, scan, atol=1e-5)
    g = jax.jit(jax.grad(lambda p: jnp.sum(compress(scfg, p, docs, mask) ** 2)))(sparams)
    assert float(jnp.sum(g["memory_embeddings"] ** 2)) > 0
    cache = init_cache(scfg, 2, 12)
    _, cache = decode(scfg, sparams, docs[:, :4], cache=cache)
    assert int(cache["index"]) == 4


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
    toks = _tokens(cfg, 2, 8)
    logits = forward_logits(cfg, tiny_params, toks)
    assert logits.dtype == jnp.float32
    ref = forward_logits(tiny_cfg, tiny_params, toks)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.05
    assert init_cache(cfg, 1, 4)["k"].dtype == jnp.bfloat16


def test_tied_embeddings_have_no_unembedding(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, tie_embeddings=True, qkv_bias=True)
    p = init_params(cfg, jax.random.key(0))
    assert "unembed" not in p["decoder"]
    assert "bias" in p["decoder"]["layers_0"]["attn"]["q"]
    assert "bias" not in p["decoder"]["layers_0"]["attn"]["o"]
    assert forward_logits(cfg, p, _tokens(cfg, 1, 4)).shape == (1, 4, cfg.vocab_size)


def test_every_parameter_has_logical_axis_names(tiny_cfg):
    for scan in (False, True):
        cfg = dataclasses.replace(tiny_cfg, scan_layers=scan)
        specs = jax.tree.leaves(logical_specs(cfg),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        shapes = jax.tree.leaves(abstract_params(cfg))
        assert len(specs) == len(shapes)
        for spec, shape in zip(specs, shapes):
            assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec)


def test_lora_targets_from_config(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, lora_targets=("q", "v"))
    p = init_params(cfg, jax.random.key(0))
    layer = p["decoder"]["layers_0"]
    assert "lora_query_a" in layer["attn"]["q"] and "lora_query_a" in layer["attn"]["v"]
    assert set(layer["attn"]["k"]) == {"kernel"} and set(layer["mlp"]["up"]) == {"kernel"}
    no_lora = init_params(dataclasses.replace(tiny_cfg, lora_rank=0), jax.random.key(0))
    assert count_params(no_lora).keys() == {"base", "memory", "latent_up", "total"}


def test_mistral_7b_parameter_count_without_allocation():
    cfg = ModelConfig.from_config(mistral_7b.get_config("compression=16"))
    counts = count_params(abstract_params(cfg))
    assert abs(counts["base"] - 7_241_732_096) / 7_241_732_096 < 1e-3
    # r=16 on q, k, v, o, gate, up, down of 32 layers: 41,943,040 per adapter.
    for adapter in ADAPTERS:
        assert counts[f"adapter:{adapter}"] == 41_943_040
    print("mistral_7b parameter counts:", counts)


def test_memory_order_puts_each_memory_token_after_its_chunk():
    from clara_jax.model.clara import memory_order

    np.testing.assert_array_equal(memory_order(5, 2, "append"), np.arange(7))
    order = memory_order(7, 3, "interleave")  # chunks of ceil(7 / 3) = 3 positions
    np.testing.assert_array_equal(order, [0, 1, 2, 7, 3, 4, 5, 8, 6, 9])
    assert sorted(order.tolist()) == list(range(10))


def test_interleaved_memory_sees_only_the_text_before_it(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, memory_layout="interleave")
    t, m = 16, cfg.num_memory_tokens
    toks = _tokens(cfg, 1, t)
    changed = toks.at[0, t - 1].set((toks[0, t - 1] + 1) % cfg.vocab_size)
    a = compress(cfg, tiny_params, toks, jnp.ones((1, t), bool))
    b = compress(cfg, tiny_params, changed, jnp.ones((1, t), bool))
    # Only the last memory token follows the last chunk, so only its latent may change.
    np.testing.assert_allclose(a[:, :m - 1], b[:, :m - 1], atol=1e-6)
    assert not np.allclose(a[:, m - 1], b[:, m - 1], atol=1e-6)
    appended = compress(tiny_cfg, tiny_params, toks, jnp.ones((1, t), bool))
    assert not np.allclose(a, appended, atol=1e-4)


def test_spread_memory_positions_place_each_memory_token_at_its_span():
    from clara_jax.model.clara import spread_memory_positions

    mask = jnp.asarray([[True] * 8, [True] * 6 + [False] * 2])
    pos = np.asarray(spread_memory_positions(mask, 4))
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 3, 4, 5, 6, 7, 2, 4, 6, 8])
    # Right padding: the valid length 6 sets the spans; padded keys are masked anyway.
    np.testing.assert_array_equal(pos[1, 8:], [1, 3, 4, 6])


def test_spread_memory_tokens_read_the_whole_document(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, memory_layout="spread")
    t = 16
    toks = _tokens(cfg, 1, t)
    changed = toks.at[0, t - 1].set((toks[0, t - 1] + 1) % cfg.vocab_size)
    a = compress(cfg, tiny_params, toks, jnp.ones((1, t), bool))
    b = compress(cfg, tiny_params, changed, jnp.ones((1, t), bool))
    # Still appended in causal order: every memory token sees the last token.
    assert not np.allclose(a[:, 0], b[:, 0], atol=1e-6)
    appended = compress(tiny_cfg, tiny_params, toks, jnp.ones((1, t), bool))
    assert not np.allclose(a, appended, atol=1e-4)


def test_bidirectional_compressor_lets_earlier_memory_tokens_see_later_ones(tiny_cfg,
                                                                          tiny_params):
    t, m = 12, tiny_cfg.num_memory_tokens
    toks, mask = _tokens(tiny_cfg, 1, t), jnp.ones((1, t), bool)
    moved = dict(tiny_params)
    moved["memory_embeddings"] = tiny_params["memory_embeddings"].at[m - 1].add(0.5)
    bidi = dataclasses.replace(tiny_cfg, compressor_attention="bidirectional")
    for cfg, sees_later in ((tiny_cfg, False), (bidi, True)):
        a = compress(cfg, tiny_params, toks, mask)
        b = compress(cfg, moved, toks, mask)
        assert np.allclose(a[:, 0], b[:, 0], atol=1e-6) != sees_later


def test_span_position_code_tells_sub_positions_apart_and_repeats_with_its_period():
    from clara_jax.model.clara import span_position_code

    code = np.asarray(span_position_code(jnp.arange(40)[None], 18, 256))[0]
    assert code.shape == (40, 256) and np.abs(code).max() <= 1.0
    np.testing.assert_allclose(code[18:36], code[:18], atol=1e-5)
    dist = np.linalg.norm(code[:18, None] - code[None, :18], axis=-1)
    assert dist[~np.eye(18, dtype=bool)].min() > 1.0  # every sub-position its own code


def test_span_code_changes_the_latents_and_keeps_them_padding_invariant(tiny_cfg,
                                                                        tiny_params):
    t = 12
    toks, mask = _tokens(tiny_cfg, 1, t), jnp.ones((1, t), bool)
    for layout in ("append", "interleave"):
        cfg = dataclasses.replace(tiny_cfg, span_code=0.02, span_code_period=4,
                                  memory_layout=layout)
        coded = compress(cfg, tiny_params, toks, mask)
        assert not np.allclose(coded, compress(dataclasses.replace(cfg, span_code=0.0),
                                               tiny_params, toks, mask), atol=1e-5), layout
    # The code follows each valid token's index: right padding leaves the latents unchanged.
    cfg = dataclasses.replace(tiny_cfg, span_code=0.02, span_code_period=4)
    short = compress(cfg, tiny_params, toks[:, :9], mask[:, :9])
    padded = compress(cfg, tiny_params, toks.at[:, 9:].set(0), mask.at[:, 9:].set(False))
    np.testing.assert_allclose(short, padded, atol=1e-5)


def test_kv_cache_with_spread_latent_positions(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, latent_span=4)
    p = _with_adapter_b(tiny_params, "generator")
    m = cfg.num_memory_tokens
    lat = compress(cfg, p, _tokens(cfg, 2, 8), jnp.ones((2, 8), bool))[:, None]
    toks = _tokens(cfg, 2, m + 6, seed=5)
    mask = jnp.ones((2, m + 6), bool)
    slot = jnp.broadcast_to((jnp.arange(m + 6) >= 1) & (jnp.arange(m + 6) < m + 1), (2, m + 6))
    full, _ = generate_logits(cfg, p, toks, mask, slot, lat)
    packed, _ = generate_logits(tiny_cfg, p, toks, mask, slot, lat)
    assert not np.allclose(full[:, m + 1:], packed[:, m + 1:], atol=1e-4)
    cache = init_cache(cfg, 2, m + 6)
    split = m + 2
    pre, cache = generate_logits(cfg, p, toks[:, :split], mask[:, :split], slot[:, :split],
                                 lat, cache=cache)
    np.testing.assert_array_equal(cache["next_position"], [1 + 4 * m + 1] * 2)
    outs = [pre]
    for i in range(split, m + 6):
        out, cache = decode(cfg, p, toks[:, i:i + 1], cache=cache, adapter="generator")
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)


def test_chunk_write_starts_as_the_published_write_and_reads_each_chunk_in_order(tiny_cfg):
    from clara_jax.model.clara import CLaRa

    m, r = tiny_cfg.num_memory_tokens, 8
    cfg = dataclasses.replace(tiny_cfg, chunk_write_rate=r)
    params = init_params(cfg, jax.random.key(0))
    assert params["chunk_write"].shape == (r, cfg.dim, cfg.latent_width)
    assert not np.any(params["chunk_write"])
    plain = {k: v for k, v in params.items() if k != "chunk_write"}
    assert count_params(params)["memory"] - count_params(plain)["memory"] == (
        r * cfg.dim * cfg.latent_width)
    t = m * r
    toks, mask = _tokens(cfg, 2, t), jnp.ones((2, t), bool)
    np.testing.assert_array_equal(compress(cfg, params, toks, mask),
                                  compress(tiny_cfg, plain, toks, mask))

    # The write itself: latent j gets positions j*R .. j*R+R-1 in order times the kernel,
    # padding zeroed; a shorter input leaves the last chunks short, a longer one (a query
    # longer than a document) adds nothing past M*R.
    kernel = jax.random.normal(jax.random.key(1), params["chunk_write"].shape)
    params = {**params, "chunk_write": kernel}
    for length in (t, t - 5, 7, t + 9):
        h = jax.random.normal(jax.random.key(2), (2, length, cfg.dim))
        valid = jnp.arange(length)[None] < jnp.array([[length], [length - 3]])
        got = CLaRa(cfg).apply({"params": params}, h, valid, method=CLaRa.chunk_latents)
        hz = np.zeros((2, t + 9, cfg.dim), np.float32)
        hz[:, :length] = np.where(np.asarray(valid)[..., None], np.asarray(h), 0)
        want = hz[:, :t].reshape(2, m, r * cfg.dim) @ np.asarray(kernel).reshape(r * cfg.dim, -1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # End to end: what the write adds to latent j comes from chunk j and the text before it
    # (the causal compressor), never from a later chunk.
    def added(tokens):
        return (compress(cfg, params, tokens, mask)
                - compress(cfg, {**params, "chunk_write": 0 * kernel}, tokens, mask))

    later = toks.at[:, t - 1].set((toks[:, t - 1] + 1) % cfg.vocab_size)
    before, after = added(toks), added(later)
    np.testing.assert_allclose(before[:, :-1], after[:, :-1], atol=1e-5)
    assert not np.allclose(before[:, -1], after[:, -1], atol=1e-3)


def test_copy_path_mixes_the_span_read_outs_into_normalised_log_probs(tiny_cfg):
    m, r = tiny_cfg.num_memory_tokens, 8
    cfg = dataclasses.replace(tiny_cfg, span_head_rate=r, latent_span=r, latent_copy=True)
    params = init_params(cfg, jax.random.key(0))
    assert count_params(params)["latent_up"] - count_params(
        {k: v for k, v in params.items() if not k.startswith("copy_")})["latent_up"] == (
        2 * cfg.dim * cfg.head_dim + r * cfg.head_dim + cfg.dim + 1)
    lat = compress(cfg, params, _tokens(cfg, 2, m * r), jnp.ones((2, m * r), bool))[:, None]
    t = m + 6
    toks, mask = _tokens(cfg, 2, t, seed=4), jnp.ones((2, t), bool)
    slot = jnp.broadcast_to(jnp.arange(t) < m, (2, t))
    logp, _ = generate_logits(cfg, params, toks, mask, slot, lat)
    np.testing.assert_allclose(jax.nn.logsumexp(logp, axis=-1), 0.0, atol=1e-4)
    # Gate open and queries zeroed: the output is the plain mean of the M x R read-outs.
    from clara_jax.model.clara import CLaRa

    wide = {**params, "copy_gate_bias": jnp.full((1,), 40.0),
            "copy_query": jnp.zeros_like(params["copy_query"])}
    logp, _ = generate_logits(cfg, wide, toks, mask, slot, lat)
    reads = jax.nn.softmax(CLaRa(cfg).apply({"params": params}, lat[:, 0],
                                            method=CLaRa.span_logits), axis=-1)
    want = reads.reshape(2, m * r, -1).mean(1)[:, None]
    np.testing.assert_allclose(np.exp(logp), np.broadcast_to(want, logp.shape), atol=1e-6)
    # A row without slots (a text row) copies nothing: the generator's own distribution.
    text = slot.at[1].set(False)
    logp, _ = generate_logits(cfg, params, toks, mask, text, lat)
    plain = {k: v for k, v in params.items() if not k.startswith("copy_")}
    own, _ = generate_logits(dataclasses.replace(cfg, latent_copy=False), plain, toks, mask,
                             text, lat)
    np.testing.assert_allclose(logp[1], jax.nn.log_softmax(own[1]), atol=1e-4)
    assert not np.allclose(logp[0], jax.nn.log_softmax(own[0]), atol=1e-3)


def test_copy_content_starts_as_the_copy_path_without_it(tiny_cfg):
    # model.copy_content's key side is zero at init, so a start without it (arm D of
    # projects/demo/README.md) keeps its function when the run turns it on; a trained key
    # side moves the pointer.
    m, r = tiny_cfg.num_memory_tokens, 8
    cfg = dataclasses.replace(tiny_cfg, span_head_rate=r, latent_span=r, latent_copy=True,
                              copy_content=True)
    params = fit_optional_params(
        cfg, {**init_params(dataclasses.replace(cfg, copy_content=False), jax.random.key(0)),
              "copy_gate_bias": jnp.full((1,), 2.0)}, 0)
    plain = {k: v for k, v in params.items()
             if not k.startswith(("copy_content", "copy_previous"))}
    lat = compress(cfg, params, _tokens(cfg, 2, m * r), jnp.ones((2, m * r), bool))[:, None]
    t = m + 6
    toks, mask = _tokens(cfg, 2, t, seed=4), jnp.ones((2, t), bool)
    slot = jnp.broadcast_to(jnp.arange(t) < m, (2, t))
    with_content, _ = generate_logits(cfg, params, toks, mask, slot, lat)
    without, _ = generate_logits(dataclasses.replace(cfg, copy_content=False), plain, toks, mask,
                                 slot, lat)
    np.testing.assert_allclose(with_content, without, atol=1e-5)
    trained = {**params, "copy_content_key": jax.random.normal(
        jax.random.key(1), params["copy_content_key"].shape)}
    moved, _ = generate_logits(cfg, trained, toks, mask, slot, lat)
    np.testing.assert_allclose(jax.nn.logsumexp(moved, axis=-1), 0.0, atol=1e-4)
    assert not np.allclose(moved, without, atol=1e-3)


def test_copy_content_keys_hold_the_token_before_each_pair_in_its_document(tiny_cfg):
    # copy_previous_key: pair s's content key gains the read-out of pair s-1 of the same
    # document (an induction match: the last answer token's state finds the pair after it);
    # a document's first pair has none before it.
    from clara_jax.model.clara import CLaRa

    m, r, k = tiny_cfg.num_memory_tokens, 8, 2
    cfg = dataclasses.replace(tiny_cfg, span_head_rate=r, latent_span=r, latent_copy=True,
                              copy_content=True)
    params = init_params(cfg, jax.random.key(0))
    assert not np.any(params["copy_previous_key"])
    params = {**params, "copy_previous_key": jax.random.normal(
        jax.random.key(3), params["copy_previous_key"].shape)}
    lat = compress(cfg, params, _tokens(cfg, 2 * k, m * r),
                   jnp.ones((2 * k, m * r), bool)).reshape(2, k, m, -1)
    t = k * m + 4
    positions = jnp.broadcast_to(jnp.arange(t), (2, t))
    slot = jnp.broadcast_to(jnp.arange(t) < k * m, (2, t))
    model = CLaRa(cfg)
    keys, probs = model.apply({"params": params}, lat, positions, slot,
                              method=CLaRa.copy_memory)
    embed = np.asarray(model.apply({"params": params}, method=CLaRa.output_embedding))
    expected = np.einsum("bsv,dv->bsd", np.asarray(probs), embed)
    before = np.zeros_like(expected).reshape(2, k, m * r, -1)
    before[:, :, 1:] = expected.reshape(2, k, m * r, -1)[:, :, :-1]
    want = before.reshape(expected.shape) @ np.asarray(params["copy_previous_key"])
    np.testing.assert_allclose(keys[..., cfg.head_dim:], want, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(keys[:, [0, m * r], cfg.head_dim:]) == 0)


def test_a_start_gets_the_optional_params_of_the_run_s_shape(tiny_cfg):
    # A start made at another rate (bench/channel.py: each length has its own) or without a
    # head gets a fresh head (and chunk write) of the run's shape; a run without one drops it.
    plain = init_params(tiny_cfg, jax.random.key(0))
    at3 = dataclasses.replace(tiny_cfg, span_head_rate=3)
    with_head = fit_optional_params(at3, plain, 0)
    assert with_head["span_head"].shape == (3, tiny_cfg.latent_width, tiny_cfg.vocab_size)
    assert with_head["latent_up"] is plain["latent_up"] and "span_head" not in plain
    np.testing.assert_array_equal(with_head["span_head"],
                                  init_params(at3, jax.random.key(0))["span_head"])
    at5 = fit_optional_params(dataclasses.replace(tiny_cfg, span_head_rate=5), with_head, 0)
    assert at5["span_head"].shape[0] == 5
    assert fit_optional_params(at3, with_head, 1)["span_head"] is with_head["span_head"]
    assert "span_head" not in fit_optional_params(tiny_cfg, with_head, 0)
    written = fit_optional_params(dataclasses.replace(at3, chunk_write_rate=3), with_head, 0)
    assert written["chunk_write"].shape == (3, tiny_cfg.dim, tiny_cfg.latent_width)
    assert written["span_head"] is with_head["span_head"]
    assert "chunk_write" not in fit_optional_params(at3, written, 0)
