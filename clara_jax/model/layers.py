"""Decoder building blocks: RMSNorm, RoPE, LoRA linear layers, grouped-query attention over a
KV cache, and the SwiGLU MLP. Shape letters as in docs/design.md."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from clara_jax.model import sharding as sh
from clara_jax.model.config import ModelConfig

NEG_INF = -1e30
PROJECTION = "projection"  # checkpoint_name of every LoRALinear output


def base_init(init):
    """`init` drawn in float32, then rounded to the requested dtype: a bfloat16 base
    (`model.base_dtype`) is the float32 one of the same seed rounded, where drawing in
    bfloat16 would give another model."""
    def draw(key, shape, dtype=jnp.float32):
        return init(key, shape, jnp.float32).astype(dtype)

    return draw


class RMSNorm(nn.Module):
    """x: float[..., D] -> float[..., D], normalised in float32; the scale is stored in
    `param_dtype` (the base's)."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(base_init(nn.initializers.ones),
                                                                 (sh.EMBED,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def apply_rope(x, positions, theta: float):
    """Rotary embedding, half-split layout (as Llama/Mistral/Qwen2 checkpoints use).

    x: float[B, T, n, H]; positions: int32[B, T] -> float[B, T, n, H].
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    cos = jnp.concatenate([cos, cos], axis=-1)  # [B, T, 1, H]: small, built once per call
    sin = jnp.concatenate([-sin, sin], axis=-1)
    # The halves are swapped by reversing an axis of size 2: an index remap that fuses into the
    # multiply, where slicing x and concatenating the results cost two passes over [B, T, n, H]
    # each way (a pad and a concatenate in the backward).
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(x.shape[:-1] + (2, half)), axis=-2).reshape(x.shape)
    return (x32 * cos + swapped * sin).astype(x.dtype)


def _dot(a, b, out_dtype=None):
    """a: float[M, K] · b: float[K, N] -> [M, N], accumulated in float32 and returned in
    `out_dtype` (default a's dtype). With bfloat16 inputs the float32 accumulation is what
    lets XLA:CPU use the AMX tiles (5x an f32 matmul here); a bfloat16 result would not."""
    return lax.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)


def _gather_transpose(a):
    rows, cols = a.shape
    flat = jnp.arange(rows)[None, :] * cols + jnp.arange(cols)[:, None]  # [cols, rows]
    return jnp.take(a.reshape(-1), flat.reshape(-1), unique_indices=True).reshape(cols, rows)


def _transposed(a):
    """a.T for a backward matmul operand: float[R, C] -> float[C, R].

    XLA:CPU turns a transpose into a layout change that its bfloat16 (AMX) matmul kernel does
    not take: with a transposed operand the matmul runs 4x slower. A gather writes the
    transpose out in row-major order for a fraction of the matmul's time. Other platforms
    and float32 keep the plain transpose."""
    if a.dtype != jnp.bfloat16:
        return a.T
    return lax.platform_dependent(a, cpu=_gather_transpose, default=jnp.transpose)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x2, w2, out_dtype=None):
    """x2: float[N, I] · w2: float[I, O] -> float[N, O] in `out_dtype` (default x2's dtype).

    Forward and backward matmuls take the compute dtype in and accumulate in float32 (autodiff
    would run the backward in float32 whenever the output is float32, as the logits are)."""
    return _dot(x2, w2, out_dtype)


def _dense_fwd(x2, w2, out_dtype):
    return _dot(x2, w2, out_dtype), (x2, w2)


def _dense_bwd(out_dtype, res, g):
    x2, w2 = res
    g = g.astype(x2.dtype)
    return _dot(g, _transposed(w2)), _dot(_transposed(x2), g, w2.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def contract_last(x, w, n: int, out_dtype=None):
    """Contracts the last n axes of x with the first n axes of w: float[..., *in] x
    float[*in, *out] -> float[..., *out].

    Both sides are flattened to 2-D before the dot so that the weight gradient is a plain
    matmul: with [B, T] kept apart XLA:CPU contracts two axes and fuses a slow transposing
    copy into the cotangent's producer (1.6x slower demo train step)."""
    lead, out = x.shape[:x.ndim - n], w.shape[n:]
    width_in = math.prod(w.shape[:n])
    y = dense(x.reshape(-1, width_in), w.reshape(width_in, -1), out_dtype)
    return y.reshape(lead + out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _merged_lora(x2, w2, a2, b2, scale: float, kernels_train: bool):
    """x2·(W + scale·A·B): x2: float[N, I]; w2: float[I, O]; a2: float[I, r]; b2: float[r, O]
    -> float[N, O].

    Without dropout the adapter folds into the kernel, so the forward is one matmul instead of
    a matmul, two thin rank-r matmuls and an [N, O] add. The adapter's gradients in the
    backward:
    - `kernels_train`: from the kernel's gradient dW = x2ᵀ·g, which the base's update needs
      anyway: dA = scale·dW·Bᵀ, dB = scale·Aᵀ·dW, two [I, O]-sized rank-r products. The
      thin [N, r] route below costs 10-15% of the demo's stage-1 step on this CPU.
    - otherwise low-rank, never forming the [I, O] product for a frozen W (XLA drops the unused
      dW): thin matmuls that put the rank first in their outputs, the layout XLA:CPU runs
      several times faster.
    LoRALinear folds only in float32 (see there), so the backward needs none of `dense`'s
    bfloat16 handling."""
    return _dot(x2, _folded(w2, a2, b2, scale))


def _folded(w2, a2, b2, scale):
    return (w2 + scale * _dot(a2, b2, jnp.float32)).astype(w2.dtype)


def _merged_lora_fwd(x2, w2, a2, b2, scale, kernels_train):
    return _dot(x2, _folded(w2, a2, b2, scale)), (x2, w2, a2, b2)


def _merged_lora_bwd(scale, kernels_train, res, g):
    x2, w2, a2, b2 = res
    g = g.astype(x2.dtype)
    dx = _dot(g, _folded(w2, a2, b2, scale).T)
    dw = _dot(x2.T, g, w2.dtype)
    if kernels_train:
        da = scale * _dot(dw, b2.T, jnp.float32)
        db = scale * _dot(a2.T, dw, jnp.float32)
    else:
        g_b = _dot(g, b2.T)  # [N, r]
        u = _dot(x2, a2)  # [N, r]
        da = scale * _dot(g_b.T, x2, jnp.float32).T
        db = scale * _dot(u.T, g, jnp.float32)
    return dx, dw, da.astype(a2.dtype), db.astype(b2.dtype)


_merged_lora.defvjp(_merged_lora_fwd, _merged_lora_bwd)


_LORA_AXES = {sh.HEAD_DIM: sh.LORA_HEAD_DIM, sh.MLP: sh.LORA_MLP}


def _lora_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """A kernel's logical axis names as its LoRA factors take them: every factor then has an
    axis that shards over fsdp (see sharding.LORA_HEAD_DIM), whichever side of the kernel its
    embed axis is on."""
    return tuple(_LORA_AXES.get(n, n) for n in names)


class LoRALinear(nn.Module):
    """A linear layer with one low-rank adapter per name, the adapter chosen per call.

    y = x·W (+ b) + (alpha / r) · dropout(x)·A·B. B starts at zero, so a fresh adapter leaves
    the base output unchanged. Every adapter's A and B are declared on every call, so all of
    them exist in the params whichever one the init pass used.

    x: float[..., *in_shape] -> float[..., *out_shape]
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    cfg: ModelConfig
    use_bias: bool = False
    lora: bool = True

    @nn.compact
    def __call__(self, x, adapter: str | None = None, deterministic: bool = True):
        cfg = self.cfg
        n_in = len(self.in_shape)
        fan_in_axes = tuple(range(n_in))
        fan_out_axes = tuple(range(n_in, n_in + len(self.out_shape)))
        # The kernel and bias belong to the base (cfg.base_dtype); the adapters stay float32.
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                base_init(nn.initializers.variance_scaling(
                    1.0, "fan_in", "truncated_normal", in_axis=fan_in_axes,
                    out_axis=fan_out_axes)),
                self.in_names + self.out_names),
            self.in_shape + self.out_shape, cfg.base_param_dtype)
        dtype = cfg.compute_dtype
        x = x.astype(dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.out_names),
                              self.out_shape, cfg.base_param_dtype).astype(dtype)
        factors = self._adapters(fan_in_axes) if self.lora and cfg.lora_rank else {}
        if adapter is not None and adapter not in cfg.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; known: {cfg.adapters}")
        kernel = kernel.astype(dtype)
        if adapter not in factors:  # no adapter asked for, or this layer carries none
            y = contract_last(x, kernel, n_in)
        else:
            a, b = (f.astype(dtype) for f in factors[adapter])
            no_dropout = deterministic or not cfg.lora_dropout
            # Folded only in float32: folded into a bfloat16 kernel, an adapter update smaller
            # than the kernel's rounding step would vanish from the forward.
            if no_dropout and dtype == jnp.float32:
                width_in, width_out = math.prod(self.in_shape), math.prod(self.out_shape)
                y = _merged_lora(x.reshape(-1, width_in), kernel.reshape(width_in, width_out),
                                 a.reshape(width_in, -1), b.reshape(-1, width_out),
                                 cfg.lora_scale, cfg.kernels_train)
                y = y.reshape(x.shape[:x.ndim - n_in] + self.out_shape)
            else:
                h = nn.Dropout(cfg.lora_dropout)(x, deterministic=no_dropout)
                y = (contract_last(x, kernel, n_in)
                     + contract_last(contract_last(h, a, n_in), b, 1) * cfg.lora_scale)
        y = y if bias is None else y + bias
        # Named for model.remat='projections', which saves this output (in the compute dtype,
        # adapter included) and recomputes what leads to it: the thin LoRA matmuls' float32
        # results, which 'dots_no_batch' saves, are never kept.
        return checkpoint_name(y, PROJECTION)

    def _adapters(self, fan_in_axes) -> dict:
        """{adapter name: (A float[*in, r], B float[r, *out])}, declared for every adapter."""
        r, n_in = self.cfg.lora_rank, len(self.in_shape)
        in_names, out_names = _lora_names(self.in_names), _lora_names(self.out_names)
        factors = {}
        for name in self.cfg.adapters:
            a = self.param(
                f"lora_{name}_a",
                nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                     in_axis=fan_in_axes, out_axis=n_in),
                    in_names + (sh.LORA_RANK,)),
                self.in_shape + (r,), jnp.float32)
            b = self.param(
                f"lora_{name}_b",
                nn.with_logical_partitioning(nn.initializers.zeros,
                                             (sh.LORA_RANK,) + out_names),
                (r,) + self.out_shape, jnp.float32)
            factors[name] = (a, b)
        return factors


def attention_mask(key_valid, q_start, num_queries: int):
    """Causal + padding mask over keys held at absolute positions 0..S-1.

    key_valid: bool[B, S]; q_start: int32[] absolute index of the first query.
    Returns bool[B, T, S] (True = may attend).
    """
    q_idx = q_start + jnp.arange(num_queries)
    k_idx = jnp.arange(key_valid.shape[1])
    causal = k_idx[None, :] <= q_idx[:, None]  # [T, S]
    return key_valid[:, None, :] & causal[None]


def _scores(qh, kh, mask):
    """Masked scores float32[B, G, r, T, S] of qh: [B, G, r·T, H] against kh: [B, G, S, H]."""
    b, g, rt, _ = qh.shape
    t = mask.shape[1]
    scores = jnp.einsum("bgqh,bgsh->bgqs", qh, kh, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, g, rt // t, t, -1)
    return jnp.where(mask[:, None, None], scores, NEG_INF)


def _attention_fwd(qh, kh, vh, mask):
    b, g, rt, _ = qh.shape
    scores = _scores(qh, kh, mask)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)).astype(vh.dtype)
    weights = weights.reshape(b, g, rt, -1)
    total = jnp.sum(weights, axis=-1, keepdims=True, dtype=jnp.float32)  # [B, G, r·T, 1]
    out = jnp.einsum("bgqs,bgsh->bgqh", weights, vh, preferred_element_type=jnp.float32)
    out = (out / total).astype(vh.dtype)
    return out, (qh, kh, vh, mask, weights, total, out)


@jax.custom_vjp
def attention_core(qh, kh, vh, mask):
    """softmax(qh·khᵀ, masked)·vh for grouped-query attention, keys and values per group.

    qh: [B, G, r·T, H] (the r = N/G query heads of a group merged with T, already scaled);
    kh, vh: [B, G, S, H]; mask: bool[B, T, S] -> float[B, G, r·T, H].

    Every matmul is a plain batched matmul with one contraction axis, and the output is
    normalised instead of the probabilities. The hand-written backward saves the unnormalised
    probabilities and goes over the [r·T, S] scores once for dS = P·(dP - rowsum(dO·O)), the
    row sum taken over the [r·T, H] output rather than over the scores."""
    return _attention_fwd(qh, kh, vh, mask)[0]


def _attention_bwd(res, d_out):
    qh, kh, vh, mask, weights, total, out = res
    d_out = d_out.astype(jnp.float32)
    d_scaled = (d_out / total).astype(vh.dtype)  # dO / l: [B, G, r·T, H]
    d_v = jnp.einsum("bgqs,bgqh->bgsh", weights, d_scaled, preferred_element_type=jnp.float32)
    d_p = jnp.einsum("bgqh,bgsh->bgqs", d_scaled, vh, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True) / total
    d_s = weights.astype(jnp.float32) * (d_p - row)
    # A row with every key masked has uniform weights; the scores' mask still stops its
    # gradient, as autodiff of the forward's `where` does.
    b, g, rt, s = d_s.shape
    d_s = jnp.where(mask[:, None, None], d_s.reshape(b, g, rt // mask.shape[1], -1, s), 0.0)
    d_s = d_s.reshape(b, g, rt, s).astype(qh.dtype)
    d_q = jnp.einsum("bgqs,bgsh->bgqh", d_s, kh, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bgqs,bgqh->bgsh", d_s, qh, preferred_element_type=jnp.float32)
    return (d_q.astype(qh.dtype), d_k.astype(kh.dtype), d_v.astype(vh.dtype), None)


attention_core.defvjp(_attention_fwd, _attention_bwd)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE over a preallocated KV cache.

    x: float[B, T, D]; positions: int32[B, T]; mask: bool[B, T, S];
    cache: (k, v) of every layer, float[layers, B, S, G, H], or None (then S = T);
    layer: this layer's index into the cache (int or int32[]); write_index: int32[].
    Returns (float[B, T, D], the cache with this layer's new keys and values written).
    The new keys and values are written into the all-layer cache in place, so a decode step
    moves only the T new rows per layer, never a copy of the cache.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache, layer, write_index, adapter, deterministic):
        cfg = self.cfg
        d, n, g, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        def proj(name, heads, head_name):
            return LoRALinear((d,), (heads, h), (sh.EMBED,), (head_name, sh.HEAD_DIM), cfg,
                              use_bias=cfg.qkv_bias, lora=name in cfg.lora_targets, name=name)

        q = proj("q", n, sh.HEADS)(x, adapter, deterministic)
        k = proj("k", g, sh.KV_HEADS)(x, adapter, deterministic)
        v = proj("v", g, sh.KV_HEADS)(x, adapter, deterministic)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)

        if cache is not None:
            k_all, v_all = cache
            start = (layer, 0, write_index, 0, 0)
            k_all = lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            cache = (k_all, v_all)
            k = k_all[layer].astype(q.dtype)
            v = v_all[layer].astype(q.dtype)

        b, t = x.shape[:2]
        # Key/value heads lead, and each group's r = N/G query heads merge with T into one
        # query axis: every attention matmul and its gradients are then plain batched matmuls
        # with one contraction axis, so XLA transposes the [B, T, N, H] arrays, never the
        # S-times larger scores (and k, v are not repeated per query head). Scaling q instead
        # of the scores, and normalising the output instead of the probabilities, keeps two
        # more elementwise passes off the scores.
        r = n // g
        qh = jnp.transpose((q * (1.0 / math.sqrt(h))).reshape(b, t, g, r, h), (0, 2, 3, 1, 4))
        kh = jnp.transpose(k, (0, 2, 1, 3))  # [B, G, S, H]
        vh = jnp.transpose(v, (0, 2, 1, 3))
        out = attention_core(qh.reshape(b, g, r * t, h), kh, vh, mask).reshape(b, g, r, t, h)
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)
        out = nn.with_logical_constraint(out, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.HEAD_DIM))
        o = LoRALinear((n, h), (d,), (sh.HEADS, sh.HEAD_DIM), (sh.EMBED,), cfg,
                       lora="o" in cfg.lora_targets, name="o")
        return o(out, adapter, deterministic), cache


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, elementwise: float[..., F] x float[..., F] -> float[..., F].

    The hand-written backward reads gate, up and the cotangent once and writes both
    gradients in one fused pass; autodiff of silu split it into several passes over [N, F]."""
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return g * up * (sig + silu * (1.0 - sig)), g * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: float[B, T, D] -> float[B, T, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, adapter, deterministic):
        cfg = self.cfg

        def lin(name, din, dout, in_name, out_name):
            return LoRALinear((din,), (dout,), (in_name,), (out_name,), cfg,
                              lora=name in cfg.lora_targets, name=name)

        gate = lin("gate", cfg.dim, cfg.mlp_dim, sh.EMBED, sh.MLP)(x, adapter, deterministic)
        up = lin("up", cfg.dim, cfg.mlp_dim, sh.EMBED, sh.MLP)(x, adapter, deterministic)
        hidden = nn.with_logical_constraint(swiglu(gate, up),
                                            (sh.BATCH, sh.LENGTH, sh.ACT_MLP))
        return lin("down", cfg.mlp_dim, cfg.dim, sh.MLP, sh.EMBED)(hidden, adapter, deterministic)
