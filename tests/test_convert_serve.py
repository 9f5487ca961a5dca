"""The zero-step route: a reference CLaRa model (tests/fixtures/clara) converted by `clara
convert from-clara` goes straight to `clara index build`, `clara eval`, `clara ask`, `clara
inspect` and `clara export` through --checkpoint=DIR, with no training step, from a working
directory that is neither the repository nor the converted one. The index holds the converted
compressor's latents, records its identity, and is refused by another model; bad --checkpoint
directories are one line.

Commands run in this process through `clara_jax.cli.run` (as tests/test_faults.py does)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import eval_support as es

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "clara"
SRC, BASE = FIXTURES / "clara", FIXTURES / "base"
# Texts in the fixture tokenizer's small vocabulary; the last is longer than the converted
# model's documents (doc_max_len 40), so it is indexed as chunks.
DOCS = [
    "The capital of the kingdom is a city of bridges and rivers.",
    "The generator reads the latent vectors instead of the text of the documents.",
    "The northern city has rivers and bridges.",
    "Each document is read by the generator as latent vectors.",
    " ".join(["The northern city of the kingdom has bridges, rivers and documents."] * 4),
]
QUESTIONS = [  # (question, index of its gold document, answer)
    ("Which city has bridges and rivers?", 0, "the capital"),
    ("What reads the latent vectors?", 1, "the generator"),
    ("Which city has rivers?", 2, "the northern city"),
]


clara = es.clara_in_process


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """root/ours: the fixture converted; root/other: the fixture with its compressor adapter
    moved a little (another release of the same architecture) converted; root/idx: ours's
    index of root/corpus.jsonl."""
    from clara_jax.convert.pth import read_pth, write_pth

    root = tmp_path_factory.mktemp("zerostep")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    moved = root / "moved_src"
    shutil.copytree(SRC, moved)
    adapters = read_pth(SRC / "adapters.pth")
    adapters["encoder_adapter"] = {k: v + np.float32(0.01) if ".lora_B." in k else v
                                   for k, v in adapters["encoder_adapter"].items()}
    write_pth(moved / "adapters.pth", adapters)
    for name, src in (("ours", SRC), ("other", moved)):
        code, _, err = clara("convert", "from-clara", src, root / name, f"--base={BASE}",
                             "--noprogress", cwd=elsewhere)
        assert code == 0, err
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"id": f"d{i}", "title": f"t{i}", "text": t}) + "\n"
        for i, t in enumerate(DOCS)))
    # The reference's evaluation_data rows: question, docs (candidates), pos_index,
    # golden_answers.
    (root / "eval.jsonl").write_text("".join(
        json.dumps({"question": q, "docs": [DOCS[g], DOCS[(g + 1) % 3]], "pos_index": [0],
                    "golden_answers": [a]}) + "\n" for q, g, a in QUESTIONS))
    code, out, err = clara("index", "build", f"--checkpoint={root / 'ours'}",
                           f"--corpus={root / 'corpus.jsonl'}", f"--out={root / 'idx'}",
                           "--noscann", cwd=elsewhere)
    assert code == 0, err
    (root / "build.json").write_text(out)
    return root


def test_index_holds_the_converted_compressors_latents(root):
    from clara_jax.convert import bundle
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.index import model_identity, open_index
    from clara_jax.index.corpus import make_tokenize, read_corpus
    from clara_jax.model import compress

    built = json.loads((root / "build.json").read_text())
    cfg, params = bundle.load_params(root / "ours")
    tok = load_tokenizer(root / "ours")
    # The data lengths come from the reference's config: doc_max_length 40 at compr_rate 10.
    config = bundle.experiment_config(root / "ours", cfg)
    assert (config.data.doc_max_len, config.data.compression_rate, config.data.num_docs) == \
        (40, 10, 2)
    records = list(read_corpus(root / "corpus.jsonl", tok, 40, int(config.data.chunk_overlap)))
    assert len(records) > len(DOCS)  # the long document is chunked
    assert built["num_docs"] == len(records)
    assert built["extra"]["checkpoint"] == str(root / "ours") and built["extra"]["step"] == 0
    assert built["identity"] == model_identity(cfg, params)

    index = open_index(root / "idx", identity=model_identity(cfg, params))
    ids = [r["id"] for r in records]
    assert index.live_ids() == ids
    tokens, mask = make_tokenize(tok, 40)(records)
    want = np.asarray(compress(cfg, params, tokens, mask))
    np.testing.assert_allclose(index.latents(ids), want, rtol=0, atol=1e-5)


def test_eval_latent_mode_on_reference_format_rows(root):
    out = root / "eval"
    code, stdout, err = clara("eval", f"--checkpoint={root / 'ours'}", f"--index={root / 'idx'}",
                              f"--data={root / 'eval.jsonl'}", f"--corpus={root / 'corpus.jsonl'}",
                              "--mode=latent", f"--out={out}", "--max_new_tokens=4",
                              "--backend=exact", "--noprogress", cwd=root / "elsewhere")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["questions"] == len(QUESTIONS) and summary["mode"] == "latent"
    for key in ("em", "f1", "cover_em", "recall_at_1", "recall_at_3", "recall_at_5"):
        assert 0.0 <= summary[key] <= 1.0, key
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["question"] for p in preds] == [q for q, _, _ in QUESTIONS]
    for p, (_, g, a) in zip(preds, QUESTIONS):
        assert p["golds"] == [a] and p["relevant"] == [f"d{g}"]
        assert p["used_docs"] == 2 and len(p["retrieved"]) >= 2  # the reference's top-k
        assert isinstance(p["prediction"], str)


def test_ask_reads_the_converted_model(root):
    code, stdout, err = clara("ask", f"--checkpoint={root / 'ours'}", f"--index={root / 'idx'}",
                              "--max_new_tokens=3", "--backend=exact",
                              "Which city has bridges and rivers?", cwd=root / "elsewhere")
    assert code == 0, err
    from clara_jax.index import open_index

    (answer,) = [json.loads(line) for line in stdout.strip().splitlines()]
    assert answer["mode"] == "latent" and isinstance(answer["answer"], str)
    assert len(answer["doc_ids"]) == 2
    assert set(answer["doc_ids"]) <= set(open_index(root / "idx").live_ids())


def test_inspect_reads_the_converted_model(root):
    code, stdout, err = clara("inspect", f"--checkpoint={root / 'ours'}",
                              f"--index={root / 'idx'}", "--doc=d0", "--max_new_tokens=3",
                              "--neighbors=2", "--backend=exact", cwd=root / "elsewhere")
    assert code == 0, err
    (out,) = [json.loads(line) for line in stdout.strip().splitlines()]
    assert out["id"] == "d0" and out["stored"]["text"] == DOCS[0]
    assert len(out["neighbors"]) == 2 and "d0" not in [n["id"] for n in out["neighbors"]]
    assert isinstance(out["decoded"], str)


def test_export_bundles_the_converted_model(root):
    from clara_jax.export.bundle import export_bundle, load_bundle

    meta = export_bundle(root / "ours", root / "bundle", index=root / "idx", progress=False)
    assert meta["source"] == {"checkpoint": str(root / "ours"), "step": 0}
    assert meta["identity"] == json.loads((root / "build.json").read_text())["identity"]
    loaded = load_bundle(root / "bundle")  # checks the params against the identity
    assert loaded.index_path is not None and loaded.model.config.data.doc_max_len == 40


def test_another_model_refuses_the_index(root):
    code, _, err = clara("eval", f"--checkpoint={root / 'other'}", f"--index={root / 'idx'}",
                         f"--data={root / 'eval.jsonl'}", "--mode=latent",
                         f"--out={root / 'eval_other'}", "--noprogress", cwd=root / "elsewhere")
    assert code == 2
    line, = err.strip().splitlines()
    assert line.startswith("clara eval: ") and "different compressor" in line
    assert "params_checksum" in line and str(root / "idx") in line
    assert not (root / "eval_other" / "summary.json").exists()


def test_bad_checkpoint_directories_are_one_line(root, tmp_path):
    from clara_jax.infer.serving import load_checkpoint_model
    from clara_jax.train.checkpoint import CheckpointError

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"neither a training run .* nor a converted model"):
        load_checkpoint_model(tmp_path / "empty")
    code, _, err = clara("index", "build", f"--checkpoint={tmp_path / 'empty'}",
                         f"--corpus={root / 'corpus.jsonl'}", f"--out={tmp_path / 'idx'}",
                         cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--checkpoint={tmp_path / 'empty'}: neither" in err

    notok = tmp_path / "notok"
    shutil.copytree(root / "ours", notok)
    (notok / "clara_tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="without a tokenizer .* pass --tokenizer=DIR"):
        load_checkpoint_model(notok)
    assert load_checkpoint_model(notok, tokenizer_dir=root / "ours").tokenizer.vocab_size == 127

    (notok / "bundle.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"a serving bundle .* pass --bundle="):
        load_checkpoint_model(notok)


def test_a_from_hf_directory_is_served_with_default_lengths(tmp_path):
    """No reference config: documents of 256 // M * M tokens, the other data fields the
    defaults; the derived config describes the converted model exactly."""
    from clara_jax.config import base_config
    from clara_jax.convert import bundle
    from clara_jax.infer.serving import load_checkpoint_model
    from clara_jax.model import ModelConfig

    bundle.from_hf(FIXTURES.parent / "hf" / "llama", tmp_path / "hf", progress=False,
                   num_memory_tokens=8)
    loaded = load_checkpoint_model(tmp_path / "hf")
    d, default = loaded.config.data, base_config().data
    assert (d.doc_max_len, d.compression_rate, d.chunk_overlap) == (256, 32, 32)
    assert (d.num_docs, d.answer_max_len) == (default.num_docs, default.answer_max_len)
    assert ModelConfig.from_config(loaded.config) == loaded.cfg and loaded.step == 0
    assert loaded.tokenizer.vocab_size <= loaded.cfg.vocab_size
