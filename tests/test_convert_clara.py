"""Reference CLaRa models in and out (clara_jax.convert.clara, .pth): parity with the outputs the
reference implementation's own classes computed (tests/fixtures/clara, made by its
make_fixtures.py), to-clara then from-clara exactness, the restricted .pth reader, refusals of
bad input, and the CLI."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from clara_jax.convert import bundle, clara, hf
from clara_jax.convert.pth import PthError, read_pth, write_pth
from clara_jax.data import prompts
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.model import compress, encode_query, generate_logits

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "clara"
SRC, BASE = FIXTURES / "clara", FIXTURES / "base"
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32; measured ~2e-6


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("clara") / "ours"
    summary = clara.from_clara(SRC, dst, base=BASE, progress=False)
    cfg, params = bundle.load_params(dst)
    return dst, summary, cfg, params, load_tokenizer(dst)


@pytest.fixture(scope="module")
def reference():
    return (np.load(FIXTURES / "reference.npz"),
            json.loads((FIXTURES / "reference.json").read_text()))


def _framed(tok, texts, length):
    rows = [prompts.encode_document(tok, t, length) for t in texts]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def test_summary_and_config(converted):
    _, summary, cfg, _, tok = converted
    assert summary["adapters"] == {"decoder_adapter": "generator",
                                   "encoder_adapter": "compressor",
                                   "query_reasoner_adapter": "query"}
    assert summary["fresh_adapters"] == [] and summary["notes"] == []
    assert (cfg.num_memory_tokens, cfg.latent_dim, cfg.lora_rank, cfg.lora_alpha) == (4, 0, 4, 8)
    assert cfg.lora_targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert (cfg.memory_layout, cfg.compressor_attention, cfg.latent_span, cfg.span_code) == (
        "append", "causal", 1, 0.0)
    assert cfg.vocab_size == summary["reference_vocab_size"] == 127 == tok.vocab_size
    # The reference's ids: <MEM0..3>, <AE>, <ENC>, <SEP> after the base tokenizer's 120.
    assert tok.mem_ids == [120, 121, 122, 123] and (tok.enc_id, tok.sep_id) == (125, 126)


def test_parity_with_the_reference(converted, reference):
    """The three reference outputs within 1e-4: the two documents' latents, the query
    reasoner's latents, and the generator's logits on the prompt holding those latents."""
    _, summary, cfg, params, tok = converted
    ref, meta = reference
    length = summary["data_config"]["data.doc_max_len"]  # 40: the fixture's texts fit
    m = cfg.num_memory_tokens
    tokens, mask = _framed(tok, meta["documents"], length)
    for i in range(len(meta["documents"])):  # our framing is the reference's, left-padded
        theirs = ref["enc_input_ids"][i][ref["enc_attention_mask"][i] == 1]
        assert tokens[i][mask[i]].tolist() + tok.mem_ids == theirs.tolist()
    latents = np.asarray(compress(cfg, params, tokens, mask))
    np.testing.assert_allclose(latents, ref["latents"], rtol=0, atol=TOL)

    q_tokens, q_mask = _framed(tok, [meta["question"]], length)
    query = np.asarray(encode_query(cfg, params, q_tokens, q_mask)).reshape(1, -1)
    np.testing.assert_allclose(query, ref["query"], rtol=0, atol=TOL)

    dec = ref["dec_input_ids"].astype(np.int32)
    slots = np.isin(dec, tok.mem_ids)
    assert slots.sum() == len(meta["documents"]) * m
    logits, _ = generate_logits(cfg, params, dec, np.ones_like(dec, bool), slots,
                                latents[None])
    np.testing.assert_allclose(np.asarray(logits)[..., :ref["logits"].shape[-1]],
                               ref["logits"], rtol=0, atol=TOL)


def test_memory_embeddings_are_the_memory_token_rows(converted):
    _, _, _, params, tok = converted
    emb = np.asarray(params["decoder"]["embedding"])
    np.testing.assert_array_equal(np.asarray(params["memory_embeddings"]), emb[tok.mem_ids])


def test_to_clara_then_from_clara_is_exact(converted, tmp_path):
    dst, _, cfg, params, tok = converted
    out = tmp_path / "ref"
    summary = clara.to_clara(dst, out, progress=False)
    assert summary["files"] == ["adapters.pth", "config.json", "decoder",
                                "decoder_first_last_layers.pth"]
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_model_name"] == str((out / "decoder").absolute())
    assert (config["doc_max_length"], config["compr_rate"], config["lora_r"]) == (40, 10, 4)
    adapters = read_pth(out / "adapters.pth")
    original = read_pth(SRC / "adapters.pth")
    for name, state in adapters.items():  # the source's factors, bit for bit
        for key, x in state.items():
            np.testing.assert_array_equal(x, original[name][key], err_msg=f"{name} {key}")
    back = tmp_path / "back"
    clara.from_clara(out, back, progress=False)  # the base found by decoder_model_name
    cfg2, params2 = bundle.load_params(back)
    assert cfg2 == cfg
    a = jax.tree_util.tree_leaves_with_path(params)
    b = dict(jax.tree_util.tree_leaves_with_path(params2))
    assert len(a) == len(b)
    for path, x in a:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(b[path]),
                                      err_msg=jax.tree_util.keystr(path))
    assert load_tokenizer(back)._meta() == tok._meta()


def test_a_missing_adapter_is_left_fresh_and_reported(tmp_path):
    src = tmp_path / "stage1"
    shutil.copytree(SRC, src)
    tree = read_pth(src / "adapters.pth")
    del tree["query_reasoner_adapter"]
    write_pth(src / "adapters.pth", tree)
    summary = clara.from_clara(src, tmp_path / "out", base=BASE, progress=False)
    assert summary["fresh_adapters"] == ["query"] and "query" in summary["notes"][0]
    _, params = bundle.load_params(tmp_path / "out")
    b = np.asarray(params["decoder"]["layers_0"]["attn"]["q"]["lora_query_b"])
    assert not b.any()  # fresh: B = 0, so the query encoder is the base decoder
    assert np.asarray(params["decoder"]["layers_0"]["attn"]["q"]["lora_compressor_b"]).any()


def test_shared_memory_token_maps_to_equal_rows(tmp_path):
    """different_mem_tokens=False: one <MEM> token, M equal memory embeddings; to-clara
    writes it back as one shared token."""
    src = tmp_path / "shared"
    shutil.copytree(SRC, src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink()  # the reference rebuilds it from the base's: so do we
    config = json.loads((src / "config.json").read_text())
    config["different_mem_tokens"] = False
    (src / "config.json").write_text(json.dumps(config))
    first_last = read_pth(src / "decoder_first_last_layers.pth")
    first_last = {k: v[:124] for k, v in first_last.items()}  # 120 + <MEM>, <AE>, <ENC>, <SEP>
    write_pth(src / "decoder_first_last_layers.pth", first_last)
    for state in (tree := read_pth(src / "adapters.pth")).values():
        for key in (clara.EMBED, clara.LM_HEAD):
            state[key] = first_last[key]
    write_pth(src / "adapters.pth", tree)
    summary = clara.from_clara(src, tmp_path / "out", base=BASE, progress=False)
    assert summary["reference_vocab_size"] == 124
    _, params = bundle.load_params(tmp_path / "out")
    memory = np.asarray(params["memory_embeddings"])
    np.testing.assert_array_equal(memory, np.broadcast_to(first_last[clara.EMBED][120],
                                                          memory.shape))
    # The base tokenizer has no pad token: our <pad> and <MEM0..3> come after the reference's
    # 124 ids.
    assert summary["vocab_size"] == 124 + 1 + 4
    json_config = json.loads((tmp_path / "out" / clara.KEPT_CONFIG_FILE).read_text())
    assert json_config["different_mem_tokens"] is False
    out = clara.to_clara(tmp_path / "out", tmp_path / "ref", dtype="bfloat16", progress=False)
    assert out["different_mem_tokens"] is False and out["reference_vocab_size"] == 129
    written = read_pth(tmp_path / "ref" / "adapters.pth")["encoder_adapter"]
    assert written["model.layers.1.mlp.down_proj.lora_B.weight"].dtype.name == "bfloat16"


# ----------------------------------------------------------------------------- .pth files


def test_pth_round_trip_and_dtypes(tmp_path):
    import ml_dtypes

    tree = {"a": {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                  "h": np.ones((2, 2), np.float16)},
            "b": np.array([1.5, -2.0], ml_dtypes.bfloat16), "empty": np.zeros((0, 3))}
    write_pth(tmp_path / "t.pth", tree)
    back = read_pth(tmp_path / "t.pth")
    for key, x in [("w", tree["a"]["w"]), ("h", tree["a"]["h"])]:
        assert back["a"][key].dtype == x.dtype
        np.testing.assert_array_equal(back["a"][key], x)
    assert back["b"].dtype == tree["b"].dtype and back["b"].tolist() == [1.5, -2.0]
    assert back["empty"].shape == (0, 3)


def _zip_with_pickle(path: Path, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/version", "3\n")
    return path


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickled by a plain pickle.load, this runs a shell command
        return (os.system, (f"touch {self.marker}",))


def test_pth_refuses_any_other_global_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    file = _zip_with_pickle(tmp_path / "evil.pth", pickle.dumps({"x": _Evil(marker)},
                                                                protocol=2))
    with pytest.raises(PthError, match=r"evil\.pth: the pickle names the global "
                                       r"(posix|nt)\.system; only tensors"):
        read_pth(file)
    assert not marker.exists()


def test_pth_refuses_legacy_and_missing_files(tmp_path):
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PthError, match="legacy.pth: not a torch.save zip archive"):
        read_pth(tmp_path / "legacy.pth")
    with pytest.raises(PthError, match="nope.pth: no such file"):
        read_pth(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- refusals


def _copy(tmp_path, name="src") -> Path:
    return Path(shutil.copytree(SRC, tmp_path / name))


@pytest.mark.parametrize("missing", ["adapters.pth", "decoder_first_last_layers.pth"])
def test_refuses_a_missing_pth(tmp_path, missing):
    src = _copy(tmp_path)
    (src / missing).unlink()
    with pytest.raises(hf.ConversionError, match=rf"{missing}: no such file") as e:
        clara.from_clara(src, tmp_path / "out", base=BASE, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_refuses_a_pickle_that_is_not_a_plain_tensor_dict(tmp_path):
    src = _copy(tmp_path)
    _zip_with_pickle(src / "adapters.pth", pickle.dumps({"encoder_adapter": [1, 2]}, protocol=2))
    with pytest.raises(hf.ConversionError, match=r"adapters\.pth: not a plain tensor dict"):
        clara.from_clara(src, tmp_path / "out", base=BASE, progress=False)
    _zip_with_pickle(src / "decoder_first_last_layers.pth",
                     pickle.dumps(collections_ordered(), protocol=2))
    with pytest.raises(hf.ConversionError, match=r"decoder_first_last_layers\.pth: holds"):
        clara.from_clara(src, tmp_path / "out", base=BASE, progress=False)


def collections_ordered():
    import collections

    return collections.OrderedDict()  # an allowed container, but not the tensors needed


def test_the_published_latent_layout_is_kept(tmp_path):
    # The reference compressor was trained with appended memory tokens and packed slots.
    with pytest.raises(hf.ConversionError, match=r"\['latent_span', 'span_code'\] come from"):
        clara.from_clara(SRC, tmp_path / "x", base=BASE, progress=False, latent_span=4,
                         span_code=0.02)
    assert not (tmp_path / "x").exists()


def test_refuses_an_adapter_rank_other_than_the_config(tmp_path):
    src = _copy(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["lora_r"] = 8
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.ConversionError,
                       match=r"adapters\.pth: adapter 'decoder_adapter' tensor "
                             r"'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has rank 4, "
                             r"but config\.json has lora_r=8"):
        clara.from_clara(src, tmp_path / "out", base=BASE, progress=False)


def test_refuses_a_base_it_cannot_find(tmp_path):
    src = _copy(tmp_path)  # decoder_model_name is ../base, not beside the copy
    with pytest.raises(hf.ConversionError, match=r"field 'decoder_model_name'='\.\./base': "
                                                 "not a local directory; pass --base=DIR"):
        clara.from_clara(src, tmp_path / "out", progress=False)


def test_to_clara_refuses_a_latent_projection(converted, tmp_path):
    dst, *_ = converted
    src = Path(shutil.copytree(dst, tmp_path / "proj"))
    d = json.loads((src / bundle.MODEL_CONFIG_FILE).read_text())
    d["latent_dim"] = 16
    (src / bundle.MODEL_CONFIG_FILE).write_text(json.dumps(d))
    with pytest.raises(hf.ConversionError, match="field 'latent_dim'=16: the reference has no "
                                                 "latent projection"):
        clara.to_clara(src, tmp_path / "out", progress=False)


def test_cli(tmp_path):
    """`clara convert from-clara`: one JSON line; a refusal is one line naming the file, exit
    status 1."""
    cmd = [sys.executable, "-m", "clara_jax.cli", "convert"]
    env = {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(cmd + ["from-clara", str(SRC), str(tmp_path / "ours"), f"--base={BASE}",
                               "--noprogress", "--set", "scan_layers=True"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["model_config"]["scan_layers"] is True
    src = _copy(tmp_path)
    (src / "adapters.pth").unlink()
    bad = subprocess.run(cmd + ["from-clara", str(src), str(tmp_path / "x"), f"--base={BASE}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (f"clara convert from-clara: {src / 'adapters.pth'}: no such "
                                  "file (a reference CLaRa directory holds config.json, "
                                  "adapters.pth and decoder_first_last_layers.pth)")
