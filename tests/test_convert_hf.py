"""Hugging Face checkpoints in and out (clara_jax.convert): the decoder against PyTorch logits of
tiny random Llama / Mistral / Qwen2 models (tests/fixtures/hf, made by make_fixtures.py),
greedy continuations, to-hf then from-hf, sharded files, vocabulary growth, both layer layouts,
refusals, the mistral_7b config against Mistral-7B-Instruct-v0.2's config.json, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from clara_jax.convert import bundle, hf
from clara_jax.model import ModelConfig, forward_logits, param_group
from tests import eval_support as es
from tests.conftest import xla_flags

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
FAMILIES = ("llama", "llama_tied", "mistral", "qwen2")
REPO = Path(__file__).resolve().parents[1]


def _reference(family):
    ref = np.load(FIXTURES / family / "reference.npz")
    meta = json.loads((FIXTURES / family / "reference.json").read_text())
    return meta["prompts"], [ref[f"logits_{i}"] for i in range(len(meta["prompts"]))], \
        meta["continuations"]


_LOADED: dict = {}


def _load(family, **kw):
    """hf.load, memoised per (family, options): every load compiles the adapter init."""
    key = (family, tuple(sorted(kw.items())))
    if key not in _LOADED:
        _LOADED[key] = hf.load(FIXTURES / family, progress=False, **kw)
    return _LOADED[key]


def _flat(params):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _st_tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _logits_fn(cfg):
    return jax.jit(lambda p, t: forward_logits(cfg, p, t))


def _greedy(cfg, params, prompts, steps):
    """Greedy decoding by full forwards (no cache). Rows are right-padded to one length so a
    single compiled forward serves every step; causal attention keeps the padding out of the
    positions read."""
    fn = _logits_fn(cfg)
    rows = [list(p) for p in prompts]
    width = max(map(len, rows)) + steps
    for _ in range(steps):
        tokens = np.zeros((len(rows), width), np.int32)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = r
        logits = np.asarray(fn(params, tokens))
        for b, r in enumerate(rows):
            r.append(int(np.argmax(logits[b, len(r) - 1])))
    return [r[len(p):] for r, p in zip(rows, prompts)]


# ----------------------------------------------------------------------------- vs PyTorch


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_pytorch(family):
    cfg, params = _load(family)
    prompts, refs, _ = _reference(family)
    fn = _logits_fn(cfg)
    for ids, ref in zip(prompts, refs):
        got = np.asarray(fn(params, np.asarray([ids], np.int32)))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4, family
    # The reference is sensitive to the mapping: a wrong RoPE base alone breaks the match.
    wrong = dataclasses.replace(cfg, rope_theta=10000.0)
    got = np.asarray(_logits_fn(wrong)(params, np.asarray([prompts[1]], np.int32)))
    assert np.abs(got - refs[1]).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuations_match_pytorch(family):
    cfg, params = _load(family)
    prompts, _, conts = _reference(family)
    assert _greedy(cfg, params, prompts, len(conts[0])) == conts


def test_config_fields_per_family():
    expect = {"llama": (False, False, 500000.0), "llama_tied": (False, True, 2500.0),
              "mistral": (False, False, 1e6), "qwen2": (True, True, 20000.0)}
    for family, (bias, tied, theta) in expect.items():
        cfg = hf.model_config_from_hf(hf.read_hf_config(FIXTURES / family))
        assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.rope_theta) == (bias, tied, theta)
        assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (32, 4, 2, 8)
        assert cfg.num_memory_tokens == hf.DEFAULT_NUM_MEMORY_TOKENS


def test_fresh_parts_leave_the_base_output_unchanged():
    cfg, params = _load("qwen2")
    other_cfg, other = _load("qwen2", seed=1)
    assert other_cfg == cfg
    fa, fb = _flat(params), _flat(other)
    n_b = 0
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        k = jax.tree_util.keystr(path)
        name = getattr(path[-1], "key", "")
        if param_group(path) == "base":
            np.testing.assert_array_equal(fa[k], fb[k])  # the seed touches no base weight
        elif name.endswith("_b"):
            n_b += 1
            assert not np.any(fa[k])  # every adapter's B starts at zero
        elif fa[k].size > 1 and np.any(fa[k]):
            assert not np.array_equal(fa[k], fb[k]), k
    assert n_b == 3 * 7 * cfg.n_layers
    assert fa["['memory_embeddings']"].shape == (cfg.num_memory_tokens, cfg.dim)


def test_a_span_head_is_drawn_fresh_for_a_stage_1_run():
    # `clara train --init_from_hf` with model.span_head: the checkpoint has no such head, so
    # the load draws one with the other fresh parts.
    cfg, params = _load("llama", span_head_rate=4)
    assert cfg.span_head_rate == 4
    assert params["span_head"].shape == (4, cfg.latent_width, cfg.vocab_size)
    assert float(np.std(np.asarray(params["span_head"]))) > 0
    assert "span_head" not in _load("llama")[1]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family,shard_bytes", [("llama", 30_000), ("llama_tied", 10**9),
                                                ("mistral", 10**9), ("qwen2", 25_000)])
def test_to_hf_then_from_hf_is_identical(family, shard_bytes, tmp_path):
    cfg, params = _load(family)
    src_config = hf.read_hf_config(FIXTURES / family)
    out = hf.save(cfg, params, tmp_path / "out", hf_config=src_config,
                  max_shard_bytes=shard_bytes, progress=False)
    # The written tensors are the checkpoint's, bit for bit.
    original, written = _st_tensors(FIXTURES / family), _st_tensors(out)
    assert written.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(written[name], original[name], err_msg=name)
    index = out / hf.INDEX_FILE
    if shard_bytes < 10**9:
        meta = json.loads(index.read_text())
        files = sorted(p.name for p in out.glob("*.safetensors"))
        assert len(files) > 1 and set(meta["weight_map"].values()) == set(files)
        assert set(meta["weight_map"]) == set(original)
        assert meta["metadata"]["total_size"] == sum(x.nbytes for x in original.values())
    else:
        assert not index.exists() and (out / hf.SINGLE_FILE).exists()
    written_config = hf.read_hf_config(out)
    assert hf.model_config_from_hf(written_config) == hf.model_config_from_hf(src_config)
    assert written_config["bos_token_id"] == src_config["bos_token_id"]
    cfg2, params2 = hf.load(out, progress=False)
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)


def test_scan_layers_and_vocab_growth(tmp_path):
    """Stacked layers, an untied unembedding grown by 11 ids (padded to 64), and back."""
    cfg, params = _load("llama", scan_layers=True, min_vocab_size=139)
    assert cfg.scan_layers and cfg.vocab_size == 192
    layers = params["decoder"]["layers"]
    assert layers["attn"]["q"]["kernel"].shape == (cfg.n_layers, cfg.dim, cfg.n_heads,
                                                   cfg.head_dim)
    assert layers["attn"]["q"]["lora_query_a"].shape[0] == cfg.n_layers
    # The same base weights as the per-layer layout.
    _, flat_params = _load("llama")
    for i in range(cfg.n_layers):
        np.testing.assert_array_equal(np.asarray(layers["mlp"]["down"]["kernel"][i]),
                                      np.asarray(flat_params["decoder"][f"layers_{i}"]["mlp"]
                                                 ["down"]["kernel"]))
    prompts, refs, conts = _reference("llama")
    fn = _logits_fn(cfg)
    for ids, ref in zip(prompts, refs):
        got = np.asarray(fn(params, np.asarray([ids], np.int32)))
        assert got.shape[-1] == 192
        assert np.abs(got[..., :128] - ref).max() < 1e-4
        # New ids score the mean logit: never the argmax of the base model.
        np.testing.assert_allclose(got[..., 128:], np.broadcast_to(
            got[..., :128].mean(-1, keepdims=True), got[..., 128:].shape), atol=1e-5)
    assert _greedy(cfg, params, prompts, len(conts[0])) == conts

    out = hf.save(cfg, params, tmp_path / "grown", hf_config=hf.read_hf_config(
        FIXTURES / "llama"), max_shard_bytes=40_000, progress=False)
    written = _st_tensors(out)
    assert written["lm_head.weight"].shape == (192, cfg.dim)
    assert written["model.embed_tokens.weight"].shape == (192, cfg.dim)
    assert hf.read_hf_config(out)["vocab_size"] == 192
    cfg2, params2 = hf.load(out, scan_layers=True, progress=False)
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)


def test_bfloat16_export_and_base(tmp_path):
    cfg, params = _load("llama_tied")
    out = hf.save(cfg, params, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert hf.read_hf_config(out)["torch_dtype"] == "bfloat16"
    with safe_open(str(out / hf.SINGLE_FILE), framework="flax") as f:
        emb = np.asarray(f.get_tensor("model.embed_tokens.weight"))
    assert emb.dtype == jnp.bfloat16
    want = np.asarray(params["decoder"]["embedding"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(emb, want)
    cfg2, p32 = hf.load(out, progress=False)
    cfg16, p16 = hf.load(out, param_dtype="bfloat16", progress=False)
    assert cfg2 == cfg and cfg16.base_dtype == "bfloat16"
    # Without param_dtype the config's base_dtype (e.g. from --config) decides.
    cfg_b, p_b = hf.load(out, base_dtype="bfloat16", progress=False)
    assert cfg_b == cfg16 and p_b["decoder"]["embedding"].dtype == jnp.bfloat16
    assert p32["decoder"]["embedding"].dtype == jnp.float32
    assert p16["decoder"]["embedding"].dtype == jnp.bfloat16
    assert p16["memory_embeddings"].dtype == jnp.float32  # only the frozen base is bfloat16
    np.testing.assert_array_equal(np.asarray(p32["decoder"]["embedding"]),
                                  want.astype(np.float32))
    prompts, refs, _ = _reference("llama_tied")
    got = np.asarray(_logits_fn(cfg)(p16, np.asarray([prompts[0]], np.int32)))
    assert np.abs(got - refs[0]).max() < 0.1  # bfloat16 weights: close, not exact


def test_bundle_with_bfloat16_base(tmp_path):
    """from-hf with --param_dtype=bfloat16 keeps the frozen base in bfloat16 on disk and back;
    to-hf in bfloat16 writes those values exactly."""
    summary = bundle.from_hf(FIXTURES / "llama_tied", tmp_path / "a", param_dtype="bfloat16",
                             num_memory_tokens=4, progress=False)
    assert summary["vocab_size"] == 128  # 120 + <pad>, <ENC>, <SEP>, 4 memory tokens fit
    cfg, params = bundle.load_params(tmp_path / "a")
    assert cfg.num_memory_tokens == 4 and cfg.tie_embeddings
    assert cfg.base_dtype == "bfloat16"  # model_config.json says how the base is stored
    assert params["decoder"]["layers_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    assert params["decoder"]["layers_0"]["attn"]["q"]["lora_generator_a"].dtype == jnp.float32
    assert params["memory_embeddings"].dtype == jnp.float32
    bundle.to_hf(tmp_path / "a", tmp_path / "b", dtype="bfloat16", progress=False)
    with safe_open(str(tmp_path / "b" / hf.SINGLE_FILE), framework="flax") as f:
        q = np.asarray(f.get_tensor("model.layers.0.self_attn.q_proj.weight"))
    original = _st_tensors(FIXTURES / "llama_tied")["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, original.astype(jnp.bfloat16))
    assert json.loads((tmp_path / "a" / bundle.MODEL_CONFIG_FILE).read_text())[
        "lora_targets"] == list(cfg.lora_targets)
    with pytest.raises(hf.ConversionError, match=r"model_config\.json: unknown field.*'colour'"):
        bundle.model_config_from_dict({**bundle.model_config_to_dict(cfg), "colour": 1})


@pytest.mark.parametrize("changes", [
    dict(span_code=0.02, span_code_period=8),
    dict(span_code=0.02, span_code_period=8, latent_span=8),
    dict(compressor_attention="bidirectional"),
    dict(span_head_rate=8),
])
def test_experiment_config_of_a_converted_model_describes_it(tmp_path, tiny_cfg, changes):
    cfg = dataclasses.replace(tiny_cfg, **changes)
    assert ModelConfig.from_config(bundle.experiment_config(tmp_path, cfg)) == cfg


_MESH_SCRIPT = r"""
import json, sys
import numpy as np, jax
from clara_jax.convert import hf
from clara_jax.model import forward_logits, logical_specs
from clara_jax.model.sharding import logical_to_shardings, make_mesh

path = sys.argv[1]
cfg = hf.model_config_from_hf(hf.read_hf_config(path), scan_layers=True)
mesh = make_mesh(data=1, fsdp=4, tensor=2)
shardings = logical_to_shardings(logical_specs(cfg), mesh)
cfg, params = hf.load(path, shardings=shardings, scan_layers=True, progress=False)
placed = jax.tree.map(lambda x, s: x.sharding == s, params, shardings)
q = params["decoder"]["layers"]["attn"]["q"]["kernel"]
ids = json.load(open(path + "/reference.json"))["prompts"][0]
ref = np.load(path + "/reference.npz")["logits_0"]
with mesh:
    got = jax.jit(lambda p, t: forward_logits(cfg, p, t))(params, np.asarray([ids], np.int32))
print(json.dumps({"all_placed": all(jax.tree.leaves(placed)),
                  "q_shards": len(q.addressable_shards), "q_spec": str(q.sharding.spec),
                  "diff": float(np.abs(np.asarray(got) - ref).max())}))
"""


def test_load_straight_onto_a_mesh():
    """Each leaf goes to its NamedSharding as it is converted (8 host devices, fsdp x tensor)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    run = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(FIXTURES / "llama")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["all_placed"] and out["q_shards"] == 8
    assert "fsdp" in out["q_spec"] and "tensor" in out["q_spec"]
    assert out["diff"] < 1e-4


# ----------------------------------------------------------------------------- refusals


def _edited_copy(tmp_path, family, edit_config=None, edit_tensors=None) -> Path:
    dst = tmp_path / family
    shutil.copytree(FIXTURES / family, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = _st_tensors(dst)
        edit_tensors(tensors)
        for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
            f.unlink()
        save_file(tensors, str(dst / hf.SINGLE_FILE), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family,edit,words", [
    ("llama", lambda c: c.update(model_type="gemma"), ["model_type", "gemma", "supported"]),
    ("llama", lambda c: c.update(architectures=["LlamaForSequenceClassification"]),
     ["architectures"]),
    ("llama", lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}),
     ["rope_scaling", "linear"]),
    ("llama", lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                  "rope_theta": 500000.0}),
     ["rope_parameters", "llama3"]),
    ("llama", lambda c: c.update(attention_bias=True), ["attention_bias"]),
    ("llama", lambda c: c.update(mlp_bias=True), ["mlp_bias"]),
    ("llama", lambda c: c.update(hidden_act="gelu"), ["hidden_act", "gelu"]),
    ("llama", lambda c: c.update(quantization_config={"quant_method": "gptq"}),
     ["quantization_config"]),
    ("mistral", lambda c: c.update(sliding_window=16), ["sliding_window", "16", "max_len"]),
    ("qwen2", lambda c: c.update(use_sliding_window=True, sliding_window=8, layer_types=[
        "sliding_attention"] * 2), ["use_sliding_window", "8"]),
    ("qwen2", lambda c: c.update(rope_theta=1.0), ["rope_theta", "disagrees"]),
    ("qwen2", lambda c: c.update(num_key_value_heads=3), ["num_key_value_heads", "divide"]),
])
def test_refuses_unsupported_configs(tmp_path, family, edit, words):
    path = _edited_copy(tmp_path, family, edit_config=edit)
    with pytest.raises(hf.ConversionError) as e:
        hf.load(path, progress=False)
    message = str(e.value)
    assert str(path / "config.json") in message
    for w in words:
        assert w in message, message


def test_sliding_window_beyond_max_len_is_accepted():
    config = hf.read_hf_config(FIXTURES / "mistral") | {"sliding_window": 16}
    assert hf.model_config_from_hf(config, max_len=16).max_len == 16
    v4 = {k: v for k, v in config.items() if k != "rope_parameters"} | {"rope_theta": 5e5,
                                                                        "sliding_window": 512}
    cfg = hf.model_config_from_hf(v4)  # transformers-4 style config: top-level rope_theta
    assert cfg.rope_theta == 5e5 and cfg.max_len == 256


def test_refuses_bad_tensors_and_overrides(tmp_path):
    missing = _edited_copy(tmp_path / "a", "llama",
                           edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.ConversionError, match=r"missing.*model\.layers\.1\.mlp\.up_proj"):
        hf.load(missing, progress=False)
    extra = _edited_copy(tmp_path / "b", "qwen2", edit_tensors=lambda t: t.update(
        {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(hf.ConversionError, match=r"does not know.*q_norm"):
        hf.load(extra, progress=False)
    shape = _edited_copy(tmp_path / "c", "llama",
                         edit_config=lambda c: c.update(intermediate_size=48))
    with pytest.raises(hf.ConversionError, match=r"model\.safetensors: tensor 'model\.layers\.0"
                       r"\.mlp\.\w+_proj\.weight' has shape \[\d+, \d+\], but config\.json .*48"):
        hf.load(shape, progress=False)
    ints = _edited_copy(tmp_path / "d", "llama", edit_tensors=lambda t: t.update(
        {"model.norm.weight": np.ones(32, np.int8)}))
    with pytest.raises(hf.ConversionError, match=r"model\.norm\.weight.*I8"):
        hf.load(ints, progress=False)
    pickled = tmp_path / "e"
    pickled.mkdir()
    shutil.copy(FIXTURES / "llama" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(hf.ConversionError, match=r"pytorch_model\.bin"):
        hf.load(pickled, progress=False)
    with pytest.raises(hf.ConversionError, match=r"\['dim'\].*cannot be changed"):
        hf.load(FIXTURES / "llama", dim=8)
    with pytest.raises(hf.ConversionError, match=r"unknown ModelConfig override.*'colour'"):
        hf.load(FIXTURES / "llama", colour=1)
    with pytest.raises(hf.ConversionError, match=r"no such file"):
        hf.load(tmp_path / "nowhere")


def test_save_refuses_non_empty_dir_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    cfg, params = _load("llama_tied")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(hf.ConversionError, match="not empty"):
        hf.save(cfg, params, dst, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    broken = jax.tree.map(lambda x: x, params)
    broken["decoder"]["layers_1"]["mlp"]["up"]["kernel"] = jnp.zeros((3, 3))
    with pytest.raises(hf.ConversionError, match=r"layers_1/mlp/up/kernel has shape \(3, 3\)"):
        hf.save(cfg, broken, tmp_path / "fresh", progress=False)
    # A failure half-way through the shards leaves neither a temp dir nor a partial output.
    calls = []

    def failing(x, kind, shape):
        calls.append(kind)
        if len(calls) == 12:
            raise OSError("disk full")
        return to_hf(x, kind, shape)

    to_hf = hf._to_hf
    monkeypatch.setattr(hf, "_to_hf", failing)
    with pytest.raises(OSError, match="disk full"):
        hf.save(cfg, params, tmp_path / "fresh", max_shard_bytes=20_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir, no "fresh"


# ----------------------------------------------------------------------------- Mistral-7B


def test_mistral_7b_config_matches_the_checkpoint():
    from configs import mistral_7b

    hf_config = hf.read_hf_config(FIXTURES / "mistral_7b_instruct_v0.2_config.json")
    ours = ModelConfig.from_config(mistral_7b.get_config("compression=16"))
    theirs = hf.model_config_from_hf(hf_config, num_memory_tokens=ours.num_memory_tokens)
    for field in hf.HF_FIELDS + ("max_len",):
        assert getattr(ours, field) == getattr(theirs, field), field
    hf.check_shapes_match(theirs, ours)


# ----------------------------------------------------------------------------- the CLI


def _clara(*args):
    return es.clara("convert", *args, "--noprogress")


def test_cli_from_hf_to_hf_round_trip(tmp_path):
    from clara_jax.data.tokenizer import load_tokenizer

    a, b, c = tmp_path / "a", tmp_path / "b_hf", tmp_path / "c"
    run = _clara("from-hf", FIXTURES / "qwen2", a, "--set", "num_memory_tokens=16", "--set",
                 "scan_layers=True")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    # 120 BPE ids + <pad>, <ENC>, <SEP> and 16 memory tokens -> 139, padded to 192.
    assert summary["tokenizer_vocab_size"] == 139 and summary["vocab_size"] == 192
    tok = load_tokenizer(a)
    assert tok.num_memory_tokens == 16 and max(tok.special_ids) < 192
    assert tok.encode("<ENC>the city<SEP>")[0] == tok.enc_id

    run = _clara("to-hf", a, b, "--max_shard_size=40KB")
    assert run.returncode == 0, run.stderr
    assert (b / hf.INDEX_FILE).exists() and (b / "tokenizer.json").exists()
    assert (b / "generation_config.json").exists()
    exported = _st_tensors(b)
    original = _st_tensors(FIXTURES / "qwen2")
    np.testing.assert_array_equal(exported["model.embed_tokens.weight"][:128],
                                  original["model.embed_tokens.weight"])

    # Converting the export again: same tokenizer ids, no further growth, identical params.
    # (In-process: the Python API under the command, and a subprocess fewer.)
    again = bundle.from_hf(b, c, num_memory_tokens=16, scan_layers=True, progress=False)
    assert again["vocab_size"] == 192 and again["checkpoint_vocab_size"] == 192
    assert load_tokenizer(c).special_ids == tok.special_ids
    cfg_a, params_a = bundle.load_params(a)
    cfg_c, params_c = bundle.load_params(c)
    assert cfg_a == cfg_c
    _assert_trees_equal(params_a, params_c)
    prompts, refs, _ = _reference("qwen2")
    got = np.asarray(_logits_fn(cfg_c)(params_c, np.asarray([prompts[2]], np.int32)))
    assert np.abs(got[..., :128] - refs[2]).max() < 1e-4

    refused = _clara("from-hf", FIXTURES / "llama", tmp_path / "d", "--config=configs/tiny.py")
    assert refused.returncode != 0
    assert "config.model.dim=64 but the checkpoint has 32" in refused.stderr
    assert not (tmp_path / "d").exists()
    with pytest.raises(hf.ConversionError, match="not empty"):
        bundle.from_hf(FIXTURES / "qwen2", a, progress=False)
