"""Generation: the KV-cached decode loop against full recomputation, batching, per-row EOS,
sampling and bucketed compilation, on configs/tiny.py."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.infer import generation as G
from clara_jax.model import compress, decode, generate_logits
from tests.conftest import xla_flags

EOS = 1


@pytest.fixture(scope="module")
def gen_params(tiny_params):
    """Tiny params with non-zero generator adapter B factors, so a path that forgot the adapter
    (prefill or decode step) would give different tokens."""
    def bump(path, leaf):
        name = getattr(path[-1], "key", "")
        if name.startswith("lora_generator_b"):
            seed = zlib.crc32(jax.tree_util.keystr(path).encode())  # str hash varies per process
            return 0.05 * jax.random.normal(jax.random.key(seed), leaf.shape, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(bump, tiny_params)


def _prompts(cfg, lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [list(rs.randint(3, cfg.vocab_size, size=n)) for n in lengths]


def _latent_prompts(cfg, params, lengths, k=2, seed=0):
    """Prompts with K*M latent slots after a 2-token prefix, and the K documents' latents."""
    m = cfg.num_memory_tokens
    rs = np.random.RandomState(seed)
    prompts, slots = [], []
    for n in lengths:
        toks = list(rs.randint(3, cfg.vocab_size, size=n + k * m))
        prompts.append(toks)
        slots.append([2 <= i < 2 + k * m for i in range(len(toks))])
    docs = jnp.asarray(rs.randint(3, cfg.vocab_size, size=(len(lengths) * k, 12)), jnp.int32)
    lat = compress(cfg, params, docs, jnp.ones(docs.shape, bool))
    return prompts, slots, np.asarray(lat).reshape(len(lengths), k, m, -1)


def _assert_same(a: G.Generation, b: G.Generation):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-4)


def test_cached_greedy_equals_full_recomputation_text(tiny_cfg, gen_params):
    prompts = _prompts(tiny_cfg, [5, 11, 3, 16])
    kw = dict(eos_id=-1, max_new_tokens=12)
    cached = G.Generator(tiny_cfg, gen_params, **kw)(prompts)
    full = G.Generator(tiny_cfg, gen_params, use_cache=False, **kw)(prompts)
    _assert_same(cached, full)
    assert (cached.lengths == 12).all()
    # Independent reference: one row at a time, no left padding, the whole sequence re-run
    # through the plain decoder each step (right-padded to one shape, which causal attention
    # never sees, so it compiles once).
    width = 32

    @jax.jit
    def next_token(seq, n):
        logits, _ = decode(tiny_cfg, gen_params, seq[None], adapter="generator")
        return jnp.argmax(logits[0, n - 1])

    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(12):
            padded = np.zeros(width, np.int32)
            padded[:len(seq)] = seq
            seq.append(int(next_token(padded, len(seq))))
        assert list(cached.tokens[row]) == seq[len(prompt):], row


def test_cached_greedy_equals_full_recomputation_latent(tiny_cfg, gen_params):
    prompts, slots, lat = _latent_prompts(tiny_cfg, gen_params, [4, 9, 1])
    kw = dict(eos_id=-1, max_new_tokens=10)
    cached = G.Generator(tiny_cfg, gen_params, **kw)(prompts, slots=slots, latents=lat)
    full = G.Generator(tiny_cfg, gen_params, use_cache=False, **kw)(prompts, slots=slots,
                                                                    latents=lat)
    _assert_same(cached, full)
    # The first token against a single-row generator forward without left padding (right-
    # padded to one width, which causal attention never sees, so it compiles once).
    width = 32

    @jax.jit
    def first_token(toks, slot, lat_row, n):
        logits, _ = generate_logits(tiny_cfg, gen_params, toks[None], jnp.arange(width)[None] < n,
                                    slot[None], lat_row[None])
        return jnp.argmax(logits[0, n - 1])

    for row in range(3):
        n = len(prompts[row])
        toks, slot = np.zeros(width, np.int32), np.zeros(width, bool)
        toks[:n], slot[:n] = prompts[row], slots[row]
        assert int(first_token(toks, slot, lat[row], n)) == cached.tokens[row, 0]
    # The latents matter: other latents give other answers.
    other = G.Generator(tiny_cfg, gen_params, **kw)(prompts, slots=slots, latents=lat[::-1])
    assert not np.array_equal(other.tokens, cached.tokens)


def test_batch_equals_one_by_one(tiny_cfg, gen_params):
    gen = G.Generator(tiny_cfg, gen_params, eos_id=-1, max_new_tokens=8)
    prompts = _prompts(tiny_cfg, [7, 2, 14, 5, 9], seed=3)
    batch = gen(prompts)
    for i, p in enumerate(prompts):
        one = gen([p])
        np.testing.assert_array_equal(one.tokens[0], batch.tokens[i])
        np.testing.assert_allclose(one.entropy[0], batch.entropy[i], atol=1e-4)
    lprompts, slots, lat = _latent_prompts(tiny_cfg, gen_params, [3, 6, 1], seed=4)
    lbatch = gen(lprompts, slots=slots, latents=lat)
    for i in range(3):
        one = gen([lprompts[i]], slots=[slots[i]], latents=lat[i:i + 1])
        np.testing.assert_array_equal(one.tokens[0], lbatch.tokens[i])


def test_batches_beyond_the_largest_bucket_are_split(tiny_cfg, gen_params):
    prompts = _prompts(tiny_cfg, [4, 8, 6, 3, 5], seed=5)
    kw = dict(eos_id=-1, max_new_tokens=8)
    small = G.Generator(tiny_cfg, gen_params, batch_buckets=(2,), **kw)(prompts)
    whole = G.Generator(tiny_cfg, gen_params, **kw)(prompts)
    np.testing.assert_array_equal(small.tokens, whole.tokens)


def test_eos_stops_rows_independently(tiny_cfg, gen_params):
    prompts = _prompts(tiny_cfg, [6, 10, 4, 8], seed=1)
    n = 12
    free = G.Generator(tiny_cfg, gen_params, eos_id=-1, max_new_tokens=n)(prompts)
    # Pick as EOS a token that row 0 first produces at step 3 or later.
    eos = next(int(t) for j, t in enumerate(free.tokens[0]) if j >= 3
               and t not in free.tokens[0, :j])
    out = G.Generator(tiny_cfg, gen_params, eos_id=eos, pad_id=0, max_new_tokens=n)(prompts)
    stops = []
    for row in range(len(prompts)):
        seq = list(free.tokens[row])
        stop = seq.index(eos) if eos in seq else n
        stops.append(stop)
        assert out.lengths[row] == stop, row
        np.testing.assert_array_equal(out.tokens[row, :stop], free.tokens[row, :stop])
        if stop < n:
            assert out.tokens[row, stop] == eos
            assert (out.tokens[row, stop + 1:] == 0).all()
            assert (out.entropy[row, stop + 1:] == 0).all()
    assert stops[0] < n and len(set(stops)) > 1, stops


def test_sampling_is_reproducible_for_a_seed(tiny_cfg, gen_params):
    gen = G.Generator(tiny_cfg, gen_params, eos_id=-1, max_new_tokens=10)
    prompts = _prompts(tiny_cfg, [5, 9, 3], seed=2)
    hot = G.Sampling(temperature=1.5, top_k=50, top_p=0.95)
    a = gen(prompts, sampling=hot, rng=jax.random.key(7))
    b = gen(prompts, sampling=hot, rng=jax.random.key(7))
    c = gen(prompts, sampling=hot, rng=jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = gen(prompts)
    assert not np.array_equal(a.tokens, greedy.tokens)
    # Filters that leave a single token reduce sampling to greedy decoding.
    for s in (G.Sampling(temperature=2.0, top_k=1), G.Sampling(temperature=2.0, top_p=1e-6)):
        np.testing.assert_array_equal(gen(prompts, sampling=s, rng=jax.random.key(3)).tokens,
                                      greedy.tokens)


def test_sample_next_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 0.0] + [0.0] * 3]) + 1e-9)
    logits = jnp.tile(logits, (2000, 1))
    rng = jax.random.key(0)
    t, k, p = jnp.float32(1.0), jnp.int32(2), jnp.float32(1.0)
    got = np.asarray(G.sample_next(logits, rng, t, k, p))
    assert set(got) == {0, 1}
    # top_p 0.7: 0.5 < 0.7 so rank 1 is kept, 0.8 >= 0.7 so rank 2 is not.
    got = np.asarray(G.sample_next(logits, rng, t, jnp.int32(0), jnp.float32(0.7)))
    assert set(got) == {0, 1}
    frac = np.mean(got == 0)
    assert abs(frac - 0.5 / 0.8) < 0.05, frac
    got = np.asarray(G.sample_next(logits, rng, t, jnp.int32(0), jnp.float32(1.0)))
    assert set(got) == {0, 1, 2, 3}
    assert (np.asarray(G.sample_next(logits, rng, jnp.float32(0.0), k, p)) == 0).all()
    # Near-uniform logits over a real vocabulary: every draw stays inside the top 20 (the
    # cumulative mass rounding below 1 must not let the rest back in).
    wide = 0.16 * jax.random.normal(jax.random.key(1), (64, 512))
    top20 = np.argsort(-np.asarray(wide), axis=-1)[:, :20]
    for seed in range(5):
        got = np.asarray(G.sample_next(wide, jax.random.key(seed), t, jnp.int32(20), p))
        assert all(g in row for g, row in zip(got, top20))


def test_compiled_once_per_bucket_never_per_call(tiny_cfg, gen_params):
    # A config no other test uses (max_len does not change the computation), so the first
    # call must compile whatever ran before in this process.
    cfg = dataclasses.replace(tiny_cfg, max_len=tiny_cfg.max_len + 7)
    gen = G.Generator(cfg, gen_params, eos_id=EOS, max_new_tokens=7,
                      batch_buckets=(4, 8), length_buckets=(16, 32))
    before = G.trace_count()
    gen(_prompts(tiny_cfg, [3, 5]))
    assert G.trace_count() == before + 1
    # Same (batch, length) bucket: other lengths, batch sizes, seeds, sampling, EOS.
    gen(_prompts(tiny_cfg, [16, 1, 9, 2], seed=1), rng=jax.random.key(5))
    gen(_prompts(tiny_cfg, [8], seed=2), sampling=G.Sampling(temperature=0.7, top_k=5))
    G.Generator(cfg, gen_params, eos_id=7, max_new_tokens=7, batch_buckets=(4, 8),
                length_buckets=(16, 32))(_prompts(tiny_cfg, [4, 4]),
                                         sampling=G.Sampling(temperature=1.0, top_p=0.5))
    assert G.trace_count() == before + 1
    gen(_prompts(tiny_cfg, [20, 3], seed=3))  # the next length bucket
    gen(_prompts(tiny_cfg, [5] * 6, seed=4))  # the next batch bucket
    assert G.trace_count() == before + 3
    gen(_prompts(tiny_cfg, [31, 3, 2, 30, 8], seed=6))
    assert G.trace_count() == before + 4
    with pytest.raises(ValueError, match="prompt length 40"):
        gen(_prompts(tiny_cfg, [40]))


def test_answer_entropy_averages_the_first_tokens():
    gen = G.Generation(np.zeros((2, 4), np.int32), np.asarray([3, 0], np.int32),
                       np.asarray([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0]], np.float32))
    np.testing.assert_allclose(G.answer_entropy(gen, 2), [1.5, 5.0])
    np.testing.assert_allclose(G.answer_entropy(gen, 10), [2.5, 5.0])


def test_bad_inputs_are_refused(tiny_cfg, gen_params):
    gen = G.Generator(tiny_cfg, gen_params, eos_id=EOS, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        gen([[5], []])
    with pytest.raises(ValueError, match="both slots and latents"):
        gen([[5]], slots=[[False]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.Generator(tiny_cfg, gen_params, eos_id=EOS, max_new_tokens=tiny_cfg.max_len)
    with pytest.raises(ValueError, match="top_p"):
        G.Sampling(top_p=0.0)


_MESH_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from configs import tiny
from clara_jax.infer.generation import Generator, Sampling
from clara_jax.model import ModelConfig, compress, init_params, logical_specs
from clara_jax.model.sharding import logical_to_shardings, make_mesh

assert jax.device_count() == 8
cfg = ModelConfig.from_config(tiny.get_config())
params = init_params(cfg, jax.random.key(0))
params = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.05 if "lora_generator_b" in jax.tree_util.keystr(p) else x, params)
mesh = make_mesh(2, 2, 2)
sharded = jax.device_put(params, logical_to_shardings(logical_specs(cfg), mesh))
rs = np.random.RandomState(0)
prompts = [list(rs.randint(3, cfg.vocab_size, size=n)) for n in (5, 12, 3)]
m = cfg.num_memory_tokens
slots = [[1 <= i < 1 + 2 * m for i in range(len(p) + 2 * m)] for p in prompts]
lprompts = [[2] * (2 * m) + p for p in prompts]
lat = np.asarray(compress(cfg, params, jnp.asarray(rs.randint(3, 500, (6, 10))),
                          jnp.ones((6, 10), bool))).reshape(3, 2, m, -1)
hot = Sampling(temperature=1.0, top_k=20)
for kw in ({}, {"sampling": hot, "rng": jax.random.key(3)}):
    ref = Generator(cfg, params, eos_id=-1, max_new_tokens=6)
    got = Generator(cfg, sharded, eos_id=-1, max_new_tokens=6, mesh=mesh)
    assert got.batch_buckets[0] == 4, got.batch_buckets
    a, b = ref(prompts, **kw), got(prompts, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    a = ref(lprompts, slots=slots, latents=lat, **kw)
    b = got(lprompts, slots=slots, latents=lat, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
print("MESH_OK")
"""


def test_generation_on_an_8_device_mesh_matches_one_device(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "mesh_generate.py"
    script.write_text(_MESH_SCRIPT)
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(script), str(repo)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "MESH_OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("content", [False, True])
def test_copy_path_decodes_from_the_cache_as_full_recomputation_does(tiny_cfg, content):
    # model.latent_copy: the prefill puts the copy memory (keys and read-outs of every
    # latent's sub-positions) in the cache, and each decoding step mixes it in again;
    # model.copy_content's key half rides in the same cached keys.
    from clara_jax.model import init_params

    cfg = dataclasses.replace(tiny_cfg, span_head_rate=8, latent_span=8, latent_copy=True,
                              copy_content=content)
    params = init_params(cfg, jax.random.key(3))
    params = {**params, "copy_gate_bias": jnp.full((1,), 1.0)}
    if content:  # zero at init; a drawn one makes the content term count
        params["copy_content_key"] = jax.random.normal(
            jax.random.key(4), params["copy_content_key"].shape)
    prompts, slots, lat = _latent_prompts(cfg, params, [4, 9, 1])
    kw = dict(eos_id=-1, max_new_tokens=10)
    cached = G.Generator(cfg, params, **kw)(prompts, slots=slots, latents=lat)
    full = G.Generator(cfg, params, use_cache=False, **kw)(prompts, slots=slots, latents=lat)
    _assert_same(cached, full)
    # The copy path is in the answer: with its gate shut the tokens differ.
    shut = {**params, "copy_gate_bias": jnp.full((1,), -30.0)}
    plain = G.Generator(cfg, shut, **kw)(prompts, slots=slots, latents=lat)
    assert not np.array_equal(plain.tokens, cached.tokens)
