"""Pretraining on generated worlds (projects.demo.pretrain) and the shipped demo start."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from clara_jax import param_store
from clara_jax.config import load_config_file
from clara_jax.data import prepare, prompts, world
from clara_jax.data.featurize import Featurizer
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.model import ModelConfig, fit_optional_params, init_params
from clara_jax.train import checkpoint as ckpt
from projects.demo import pretrain
from tests.conftest import REPO, TINY_START_ARGS, one_device_target


@pytest.fixture(scope="module")
def pretrained(tiny_start):
    """The suite's short real pretraining run of the tiny model (tests/conftest.py):
    (its output directory, its summary as pretrain.json holds it)."""
    root, summary = tiny_start
    return root / "out", summary


def test_pretrain_trains_on_fresh_worlds_and_writes_its_outputs(pretrained, tiny_config, tiny_cfg):
    out, summary = pretrained
    assert summary["steps"] == TINY_START_ARGS["max_steps"] == 2
    assert summary["stage_steps"] == {"1": 1, "2": 1}
    assert summary["examples"] == TINY_START_ARGS["batch_size"] * summary["steps"]
    assert summary["worlds"]["first_seed"] == pretrain.FIRST_SEED
    assert summary["worlds"]["count"] >= 1
    last = summary["last"]
    for stage in (1, 2):
        for k in ("ce_right", "ce_other", "exact_right", "exact_other"):
            assert np.isfinite(last[f"stage{stage}_{k}"])
    assert (out / "tokenizer" / "tokenizer.model").exists()

    params = pretrain.load_params(out / pretrain.PARAMS_FILE, tiny_cfg)
    start = init_params(tiny_cfg, jax.random.key(int(tiny_config.train.seed)))
    assert jax.tree.structure(params) == jax.tree.structure(start)
    # Every group moved from its initial values: the base, adapters, memory, projections.
    for name in ("decoder/embedding", "decoder/layers_0/attn/q/kernel",
                 "decoder/layers_1/mlp/up/lora_compressor_b",
                 "decoder/layers_1/mlp/up/lora_generator_b", "memory_embeddings",
                 "latent_down/kernel", "latent_up/kernel"):
        a, b = param_store.flatten(params)[name], param_store.flatten(start)[name]
        assert not np.allclose(a, b), name


def test_the_focused_curriculum_trains_stage_1_qa_pairs_on_subject_sentences(tiny_config,
                                                                              tmp_path):
    prepare.world_tokenizer(tiny_config, 0, "small").save(tmp_path / "tok")
    config = tiny_config.copy_and_resolve_references()
    summary = pretrain.pretrain(config, tmp_path / "tok", tmp_path / "out", seconds=2.0,
                                batch_size=8, workers=1, eval_every_s=1e9, size="small",
                                stages=(1,), focus=True, qa_only=True, max_steps=3, bow_weight=1.0,
                                log=lambda _: None)
    assert summary["stage_steps"] == {1: summary["steps"]} and summary["steps"] >= 1
    assert (summary["stages"], summary["focus"], summary["qa_only"], summary["bow_weight"]) == (
        [1], True, True, 1.0)
    assert set(k.split("_")[0] for k in summary["last"] if k.startswith("stage")) == {"stage1"}
    # What its workers feed: QA pairs only, each document cut to its subject's sentences.
    tok = load_tokenizer(tmp_path / "tok")
    pretrain._init_worker(str(tmp_path / "tok"), {s: pretrain.featurizer_fields(tok, config, s)
                                                  for s in (1, 2)})
    try:
        _, batches = pretrain.world_batches(5, "small", focus=True, qa_only=True)
        _, plain = pretrain.world_batches(5, "small")
    finally:
        pretrain._FEATURIZERS.clear()
    whole = world.make_world(5, "small", "train")
    qa = [e for e in pretrain.stage_examples(world.focused(whole), 1) if e["data_type"] == "qa"]
    assert len(batches[1]["tokens"]) == len(qa)
    assert (batches[1]["pos_index"] >= 0).all()  # no paraphrase rows (pos_index -1)
    feat = Featurizer(tok=tok, **pretrain.featurizer_fields(tok, config, 1))
    np.testing.assert_array_equal(batches[1]["doc_tokens"][0], feat(qa[0])["doc_tokens"])
    assert not np.array_equal(batches[1]["doc_tokens"],
                              plain[1]["doc_tokens"][plain[1]["pos_index"] >= 0])
    # Stage 2 keeps whole documents: the format retrieval hands the generator.
    np.testing.assert_array_equal(batches[2]["doc_tokens"], plain[2]["doc_tokens"])


def test_the_start_state_holds_the_pretrained_params(pretrained, tiny_config, tiny_cfg,
                                                     tmp_path):
    out, _ = pretrained
    info = pretrain.write_start_state(tiny_config, out, tmp_path / "start")
    assert info["params"] == sum(np.size(x) for x in jax.tree.leaves(
        pretrain.load_params(out / pretrain.PARAMS_FILE, tiny_cfg)))
    target = one_device_target(tiny_config, tiny_cfg)
    restored, meta = ckpt.restore_params(tmp_path / "start", target)
    assert meta["step"] == 0 and meta["stage"] == 1 and meta["pretrained"] == str(out)
    want = param_store.flatten(pretrain.load_params(out / pretrain.PARAMS_FILE, tiny_cfg))
    got = param_store.flatten(restored)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_load_params_names_the_tensor_that_does_not_fit(pretrained, tiny_config, tmp_path):
    out, _ = pretrained
    cfg = ModelConfig.from_config(tiny_config)
    flat = param_store.flatten(pretrain.load_params(out / pretrain.PARAMS_FILE, cfg))
    from safetensors.numpy import save_file

    wrong = dict(flat, **{"latent_up/kernel": np.zeros((3, 3), np.float32)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="latent_up/kernel"):
        pretrain.load_params(tmp_path / "wrong.safetensors", cfg)
    missing = {k: v for k, v in flat.items() if k != "memory_embeddings"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="memory_embeddings"):
        pretrain.load_params(tmp_path / "missing.safetensors", cfg)
    with pytest.raises(FileNotFoundError, match="no params.safetensors"):
        pretrain.find_pretrained(tmp_path)


def test_a_start_without_the_copy_path_begins_a_run_with_it(pretrained, tiny_config):
    # model.chunk_write / latent_copy are off in the start: their params are drawn fresh, every
    # other tensor is the start's.
    out, _ = pretrained
    plain = param_store.flatten(pretrain.load_params(out / pretrain.PARAMS_FILE,
                                                     ModelConfig.from_config(tiny_config)))
    config = tiny_config.copy_and_resolve_references()
    config.model.span_head = config.model.chunk_write = config.model.latent_copy = True
    cfg = ModelConfig.from_config(config)
    got = param_store.flatten(pretrain.load_params(out / pretrain.PARAMS_FILE, cfg))
    assert set(got) - set(plain) == {"span_head", "chunk_write", "copy_query", "copy_key",
                                     "copy_subpos", "copy_gate", "copy_gate_bias"}
    for k in plain:
        np.testing.assert_array_equal(got[k], plain[k], err_msg=k)
    assert not np.any(got["chunk_write"])  # zero-init: the start's latents unchanged


def test_a_start_widened_to_more_latent_dims_compresses_and_generates_the_same(pretrained,
                                                                               tiny_config):
    from clara_jax.model import compress, generate_logits

    out, _ = pretrained
    narrow_cfg = ModelConfig.from_config(tiny_config)
    config = tiny_config.copy_and_resolve_references()
    config.model.latent_dim = narrow_cfg.latent_width + 16
    wide_cfg = ModelConfig.from_config(config)
    narrow = pretrain.load_params(out / pretrain.PARAMS_FILE, narrow_cfg)
    wide = pretrain.load_params(out / pretrain.PARAMS_FILE, wide_cfg)
    assert wide["latent_up"]["kernel"].shape[0] == wide_cfg.latent_width
    rng = np.random.default_rng(0)
    m = narrow_cfg.num_memory_tokens
    doc = rng.integers(3, narrow_cfg.vocab_size, (2, 12)).astype(np.int32)
    doc_mask = np.ones(doc.shape, bool)
    small, big = (np.asarray(compress(c, p, doc, doc_mask))
                  for c, p in ((narrow_cfg, narrow), (wide_cfg, wide)))
    np.testing.assert_allclose(big[..., :narrow_cfg.latent_width], small, atol=1e-5)
    assert not np.any(big[..., narrow_cfg.latent_width:])
    prompt = rng.integers(3, narrow_cfg.vocab_size, (2, m + 5)).astype(np.int32)
    slots = np.broadcast_to(np.arange(m + 5) < m, prompt.shape)
    logits = [np.asarray(generate_logits(c, p, prompt, np.ones(prompt.shape, bool), slots,
                                         lat[:, None])[0])
              for c, p, lat in ((narrow_cfg, narrow, small), (wide_cfg, wide, big))]
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)


def test_stage_examples_are_every_question_and_paraphrase_of_the_world():
    w = world.make_world(pretrain.FIRST_SEED, "small", "train")
    rows = world.world_rows(w)["stage1.jsonl"]
    exs = pretrain.stage_examples(w, 1)
    assert sum(e["data_type"] == "qa" for e in exs) == sum(
        len(r["question"]) for r in rows if r["data_type"] == "qa")
    assert sum(e["data_type"] == "paraphrase" for e in exs) == len(w.docs)
    two = pretrain.stage_examples(w, 2, limit=50, seed=3)
    assert len(two) == 50 and all(len(e["docs"]) == world.STAGE2_DOCS for e in two)
    # The demo's worlds (seed 0) and the evaluation world are never in the stream.
    assert pretrain.FIRST_SEED > max(0, pretrain.EVAL_SEED)


def test_pretraining_rows_read_latents_whatever_the_text_share(tiny_config, tmp_path):
    """data.text_share is for stages 2-3 of a run: the pretraining stream trains the channel
    through the latents, so its stage-2 rows all have slots and T is that of latent rows."""
    c = tiny_config.copy_and_resolve_references()
    c.data.text_share = 0.5
    p = pretrain.pretrain_config(c, 8, 1e-3, 0.25, 10)
    assert p.data.text_share == 0.0 and c.data.text_share == 0.5
    tok = prepare.world_tokenizer(tiny_config, 0, "small")
    fields = pretrain.featurizer_fields(tok, p, 2)
    assert fields["gen_len"] == prompts.generator_length(tiny_config, 2)
    feat = Featurizer(tok=tok, **fields)
    w = world.make_world(pretrain.FIRST_SEED, "small", "train")
    m, k = tiny_config.model.num_memory_tokens, tiny_config.data.num_docs
    assert all(feat(e)["slot_mask"].sum() == k * m
               for e in pretrain.stage_examples(w, 2, limit=20))


def test_the_shipped_demo_start_fits_the_demo_config():
    config = load_config_file(str(REPO / "configs" / "demo.py"))
    src = pretrain.find_pretrained(config.demo.pretrained)
    params = pretrain.load_params(src / pretrain.PARAMS_FILE, ModelConfig.from_config(config))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    # Its tokenizer is the one the demo's own world trains at 16x (the rate its lineage began
    # at, configs/demo.py:16x), re-rated to the demo's M: the data the demo builds means the
    # same ids either way.
    shipped = load_tokenizer(src / pretrain.TOKENIZER_DIR)
    at_16x = load_config_file(str(REPO / "configs" / "demo.py") + ":16x")
    trained = prepare.world_tokenizer(at_16x, int(config.demo.world_seed),
                                      str(config.demo.world_size)).with_memory_tokens(
        config.model.num_memory_tokens)
    text = "What is the hobby of Tiagrum Kaigias? The Golden Winter first appeared in 1812."
    assert shipped.encode(text) == trained.encode(text)
    assert shipped.vocab_size == trained.vocab_size
    record = json.loads((src / "pretrain.json").read_text())
    assert record["rerate"]["start"] == "projects/demo/start_16x"
    assert record["lineage_steps"] > 10_000 and all(r["steps"] > 0 for r in record["runs"])
    # Pretrained with the copy path the demo runs (none of its params drawn fresh).
    from safetensors import safe_open

    with safe_open(str(src / pretrain.PARAMS_FILE), "np") as f:
        assert {"span_head", "chunk_write", "copy_query", "copy_previous_key"} <= set(f.keys())


def test_int8_params_load_close_to_the_float_ones(pretrained, tiny_cfg, tmp_path):
    out, _ = pretrained
    src = out / pretrain.PARAMS_FILE
    info = pretrain.quantize_file(src, tmp_path / "q.safetensors")
    assert info["bytes"] < 0.4 * src.stat().st_size
    full = param_store.flatten(pretrain.load_params(src, tiny_cfg))
    small = param_store.flatten(pretrain.load_params(tmp_path / "q.safetensors", tiny_cfg))
    assert set(full) == set(small)
    for k in full:
        rows = full[k].reshape(full[k].shape[0], -1) if full[k].ndim > 1 else full[k][None]
        # Within half a step of the row's int8 grid (exact for norms and biases).
        tol = np.abs(rows).max(axis=1, keepdims=True) / 127 / 2 + 1e-7
        err = np.abs(small[k].reshape(rows.shape) - rows)
        assert (err <= tol).all(), k
        if full[k].ndim == 1:
            np.testing.assert_array_equal(small[k], full[k])


@pytest.mark.parametrize("name", ["start", "start_16x", "start_64x"])
def test_the_shipped_starts_are_small_int8(name):
    from safetensors.numpy import load_file

    src = pretrain.find_pretrained(f"projects/demo/{name}") / pretrain.PARAMS_FILE
    assert src.stat().st_size < 5 * 2 ** 20
    assert load_file(str(src))["decoder/embedding"].dtype == np.int8


@pytest.mark.parametrize("rate", [16, 64])
def test_the_shipped_starts_of_other_rates_fit_the_demo_config_there(rate):
    # The 16x start the demo's lineage began with, and it re-rated to 64x (projects.demo.rerate)
    # then pretrained there; both made without the copy path, so they run without it.
    from clara_jax.data.tokenizer import check_tokenizer_fits
    from projects.demo.rerate import config_at_rate

    config = load_config_file(str(REPO / "configs" / "demo.py"))
    src = pretrain.find_pretrained(f"{config.demo.pretrained}_{rate}x")
    tok = load_tokenizer(src / pretrain.TOKENIZER_DIR)
    config = config_at_rate(config, rate, src)
    check_tokenizer_fits(tok, config)
    assert not (config.model.span_head or config.model.latent_copy or config.train.pointer_weight)
    params = pretrain.load_params(src / pretrain.PARAMS_FILE, ModelConfig.from_config(config))
    assert params["memory_embeddings"].shape == (128 // rate, config.model.dim)
    assert "copy_query" not in params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    # Text encodes as with the 16x start's tokenizer: the demo's data means the same ids.
    base = load_tokenizer(pretrain.find_pretrained(config.demo.pretrained)
                          / pretrain.TOKENIZER_DIR)
    text = "What is the hobby of Tiagrum Kaigias? The Golden Winter first appeared in 1812."
    assert tok.encode(text) == base.encode(text)
    record = json.loads((src / "pretrain.json").read_text())
    assert record.get("rerate", {"rate": 16})["rate"] == rate
    assert record["runs"][-1]["steps"] > 0


def _probe_batches(out, config) -> list[dict]:
    """16 stage-1 rows of the evaluation world, in batches of 8, as the probe reads them."""
    tok = load_tokenizer(out / pretrain.TOKENIZER_DIR)
    c = pretrain.pretrain_config(config, 8, 1e-3, 0.0, 1)
    return pretrain.eval_batches(tok, {1: pretrain.featurizer_fields(tok, c, 1)}, 8, n=16)[1]


def test_answer_readout_probe_finds_answers_and_scores_them(pretrained, tiny_config, tiny_cfg):
    from projects.demo.probe_answer_readout import (
        answer_positions,
        readout_guesses,
        score_guesses,
    )

    assert answer_positions(np.array([5, 1, 2, 3, 1, 2]), np.array([1, 2])).tolist() == [1, 2]
    assert answer_positions(np.array([5, 1, 3]), np.array([1, 2])) is None
    out, _ = pretrained
    batches = _probe_batches(out, tiny_config)
    params = pretrain.load_params(out / pretrain.PARAMS_FILE, tiny_cfg)
    got = score_guesses(readout_guesses(tiny_cfg, params, batches), batches)
    assert got["rows"] == 16 and 0 < got["answers_found"] <= 16
    for k in ("token_accuracy", "answer_token_accuracy", "answers_whole"):
        assert 0.0 <= got[k] <= 1.0, (k, got)
    # Guessing the documents themselves scores 1 everywhere; spoiling the answers' tokens alone
    # scores them 0 and leaves the rest right.
    docs = [np.asarray(b["doc_tokens"][:, 0]) for b in batches]
    assert score_guesses(docs, batches) == {**got, "token_accuracy": 1.0,
                                            "answer_token_accuracy": 1.0, "answers_whole": 1.0}
    spoiled = []
    for d, b in zip(docs, batches, strict=True):
        d = d.copy()
        for i in range(len(d)):
            answer = np.asarray(b["targets"][i])[np.asarray(b["loss_mask"][i])][:-1]
            where = answer_positions(d[i][np.asarray(b["doc_mask"][i, 0])], answer)
            if where is not None:
                d[i, where] = -1
        spoiled.append(d)
    bad = score_guesses(spoiled, batches)
    assert bad["answer_token_accuracy"] == 0.0 and bad["answers_whole"] == 0.0
    assert 0.5 < bad["token_accuracy"] < 1.0


def _copy_path_start(pretrained, tiny_config):
    """(cfg, probe batches, params) of the tiny start with the copy path drawn onto it."""
    out, _ = pretrained
    config = tiny_config.copy_and_resolve_references()
    config.model.span_head = config.model.latent_copy = True
    cfg = ModelConfig.from_config(config)
    return (cfg, _probe_batches(out, config),
            pretrain.load_params(out / pretrain.PARAMS_FILE, cfg))


def test_pointer_stats_rebuild_the_copy_path_of_the_forward(pretrained, tiny_config):
    """With the gate forced shut or open, the probe's mixed probability of each answer token
    is the generator forward's own (`generate_logits`, which mixes in the copy path), and
    its ceiling is the best span read-out's (`latent_span_logits`)."""
    import jax
    import jax.numpy as jnp

    from clara_jax.model import compress_docs, generate_logits, latent_span_logits
    from projects.demo.probe_answer_readout import pointer_stats

    cfg, batches, params = _copy_path_start(pretrained, tiny_config)
    for bias, share in ((-30.0, "p_generator"), (30.0, "p_copied")):
        p = dict(params, copy_gate_bias=jnp.full((1,), bias))
        got = pointer_stats(cfg, p, batches)
        assert got["answer_tokens"] > 0 and 0.0 <= got["source_exists"] <= 1.0
        assert 0.0 <= got["pointer_mass_where_a_source_exists"] <= 1.0
        assert got["gate"] == (0.0 if bias < 0 else 1.0)
        probs = []
        for b in batches:
            latents = compress_docs(cfg, p, b["doc_tokens"], b["doc_mask"])
            logp, _ = generate_logits(cfg, p, b["tokens"], b["mask"], b["slot_mask"], latents)
            at = np.take_along_axis(np.asarray(logp), np.asarray(b["targets"])[..., None], -1)
            probs.append(np.exp(at[..., 0])[np.asarray(b["loss_mask"])])
        want = float(np.mean(np.concatenate(probs)))
        assert abs(got["p_mixed"] - want) < 2e-4, (bias, got, want)
        assert abs(got[share] - want) < 2e-4, (bias, got, want)
    # The ceiling: the target's best probability over every latent's span read-outs.
    best = []
    for b in batches:
        latents = compress_docs(cfg, params, b["doc_tokens"], b["doc_mask"])
        read = jax.nn.softmax(latent_span_logits(cfg, params, latents[:, 0], cfg.span_head_rate))
        read = np.asarray(read).reshape(read.shape[0], -1, read.shape[-1])  # [B, S, V]
        at = np.take_along_axis(read, np.asarray(b["targets"])[:, None, :], -1).max(1)
        best.append(at[np.asarray(b["loss_mask"])])
    assert abs(got["p_best_source"] - float(np.mean(np.concatenate(best)))) < 2e-4, got
    assert got["p_copied"] <= got["p_best_source"] <= got["p_oracle_mix"]
    assert got["p_generator"] <= got["p_oracle_mix"]


def test_pointer_isolation_trains_the_pointer_alone(pretrained, tiny_config):
    """The isolated pointer starts where the probe measures it and, trained on the hard
    target with the content term, moves its mass toward the best source."""
    from projects.demo.pointer_isolation import run
    from projects.demo.probe_answer_readout import pointer_stats

    cfg, batches, params = _copy_path_start(pretrained, tiny_config)
    content = dataclasses.replace(cfg, copy_content=True)
    got = run(content, fit_optional_params(content, params, 0), batches, batches, steps=60,
              loss="hard", learning_rate=3e-2)
    probe = pointer_stats(cfg, params, batches)
    for k in ("gate", "p_copied", "p_generator", "p_best_source", "p_mixed", "p_oracle_mix"):
        assert abs(got["before"][k] - probe[k]) < 2e-4, (k, got["before"], probe)
    assert got["last_loss"] < got["first_loss"], got
    assert got["after"]["mass_at_best_source"] > got["before"]["mass_at_best_source"] + 0.05, got
