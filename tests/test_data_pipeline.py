"""TFDS builds (array_record, no TensorFlow) and the grain loaders: the batch contract, exact
resume, per-process sharding, chunking, failed builds and the `clara data` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clara_jax.data import featurize, formats, pipeline, prompts, tfds_build
from clara_jax.data.formats import DataError
from tests import eval_support as es
from tests.world_support import single_process_loader

from .conftest import REPO, SHARED

REAL = SHARED / "data" / "ml-clara-example" / "pretrain_data.800.jsonl"


_loader = single_process_loader


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_batches_follow_the_contract(built, tiny_config, stage):
    out, _ = built
    c = tiny_config
    b, td, tq = c.train.batch_size, c.data.doc_max_len, c.data.question_max_len
    k, cands, m = c.data.num_docs, c.data.num_candidates, c.model.num_memory_tokens
    t = prompts.generator_length(c, stage)
    batch = next(_loader(c, stage, out))
    want = {"tokens": ((b, t), np.int32), "mask": ((b, t), np.bool_),
            "slot_mask": ((b, t), np.bool_), "targets": ((b, t), np.int32),
            "loss_mask": ((b, t), np.bool_)}
    want |= {"query_tokens": ((b, tq), np.int32), "query_mask": ((b, tq), np.bool_),
             "pos_index": ((b,), np.int32)}
    if stage in (1, 2):
        kk = 1 if stage == 1 else k
        want |= {"doc_tokens": ((b, kk, td), np.int32), "doc_mask": ((b, kk, td), np.bool_)}
    else:
        want |= {"cand_tokens": ((b, cands, td), np.int32),
                 "cand_mask": ((b, cands, td), np.bool_)}
    assert {key: (v.shape, v.dtype.type) for key, v in batch.items()} == want
    slots = (1 if stage == 1 else k) * m
    assert np.all(batch["slot_mask"].sum(1) == slots)
    assert not np.any(batch["loss_mask"] & ~batch["mask"])
    assert np.all(batch["loss_mask"].sum(1) >= 2)  # at least one answer token and EOS
    tok = pipeline.load_data_tokenizer(out)
    docs = batch["doc_tokens"] if stage < 3 else batch["cand_tokens"]
    assert np.all(docs[..., 0] == tok.enc_id) and np.all(docs[..., 1] == tok.bos_id)
    assert np.all(batch["query_tokens"][:, 0] == tok.enc_id)
    if stage == 3:
        assert np.all((batch["pos_index"] >= 0) & (batch["pos_index"] < cands))
    if stage == 2:
        assert np.all((batch["pos_index"] >= 0) & (batch["pos_index"] < k))
    if stage == 1:  # 0: a QA pair about the document; -1: a paraphrase, no question
        assert set(batch["pos_index"].tolist()) <= {0, -1}


def test_stage3_example_matches_its_row(built, tiny_config):
    out, _ = built
    rows = pipeline.read_rows("stage3", out, "heldout", limit=3)
    src = [json.loads(x) for x in open(out / "heldout" / "stage3.jsonl")][:3]
    assert [r.question for r in rows] == [s["question"] for s in src]
    assert [list(r.pos_index) for r in rows] == [s["pos_index"] for s in src]
    tok = pipeline.load_data_tokenizer(out)
    feat = featurize.Featurizer.from_config(tok, tiny_config, 3)
    source = tfds_build.data_source("stage3", out, "heldout")
    for i, row in enumerate(rows):
        ex = feat(source[i])
        keep, first = featurize.select_docs(len(row.docs), list(row.pos_index),
                                           tiny_config.data.num_candidates)
        gold = prompts.encode_document(tok, row.docs[row.pos_index[0]],
                                       tiny_config.data.doc_max_len)[0]
        assert ex["pos_index"] == first and np.array_equal(ex["cand_tokens"][first], gold)
        answer = tok.decode(ex["targets"][ex["loss_mask"]])
        assert answer.strip() == row.answer or not answer.strip()  # the tiny T may cut it
        assert row.answer.startswith(answer.strip())


def test_stage1_paraphrases_keep_their_own_length(built, tiny_config):
    """A paraphrase restates the whole document: it is cut at data.paraphrase_max_len, not at
    the short data.answer_max_len of a QA answer (which kept only the document's opening)."""
    out, summary = built
    c = tiny_config
    assert c.data.paraphrase_max_len > c.data.answer_max_len
    tok = pipeline.load_data_tokenizer(out)
    feat = featurize.Featurizer.from_config(tok, c, 1)
    source = tfds_build.data_source("stage1", out, "train")
    kinds = set()
    for i in range(40):
        ex = feat(source[i])
        target = ex["targets"][ex["loss_mask"]]
        assert target[-1] == tok.eos_id
        answer = tok.decode(target[:-1]).strip()
        if ex["pos_index"] == -1:  # paraphrase
            kinds.add("paraphrase")
            full = tok.encode(" " + featurize.as_text(source[i]["answer"]))
            assert len(target) == min(len(full) + 1, c.data.paraphrase_max_len)
            assert len(target) > c.data.answer_max_len  # world paraphrases are longer
        else:
            kinds.add("qa")
            assert len(target) <= c.data.answer_max_len
            assert featurize.as_text(source[i]["answer"]).startswith(answer)
    assert kinds == {"qa", "paraphrase"}
    stats = summary["builds"]["stage1"]["splits"]["train"]
    rows = [json.loads(line) for line in open(out / "train" / "stage1.jsonl")]
    paraphrases = [r["answers"][0] for r in rows if r["data_type"] == "paraphrase"]
    cut = sum(len(tok.encode(" " + p)) > c.data.paraphrase_max_len - 1 for p in paraphrases)
    assert stats["paraphrases_truncated"] == cut
    assert stats["tokens_per_paraphrase"]["max"] == max(len(tok.encode(p)) for p in paraphrases)


def test_select_docs_keeps_gold_first():
    assert featurize.select_docs(20, [15], 4) == ([0, 1, 2, 15], 3)
    assert featurize.select_docs(20, [7, 2], 3) == ([0, 2, 7], 2)  # the row's first gold
    assert featurize.select_docs(5, [], 2) == ([0, 1], -1)
    with pytest.raises(ValueError):
        featurize.select_docs(3, [0], 4)


def test_exact_resume_and_seeding(built, tiny_config):
    out, _ = built
    it = _loader(tiny_config, 2, out)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = _loader(tiny_config, 2, out)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    first = next(_loader(tiny_config, 2, out))["tokens"]
    assert np.array_equal(first, next(_loader(tiny_config, 2, out))["tokens"])
    assert not np.array_equal(first, next(_loader(tiny_config, 2, out, seed=5))["tokens"])


def test_processes_read_disjoint_shards(built, tiny_config):
    out, _ = built
    n = len(tfds_build.data_source("stage1", out, "heldout"))
    seen = []
    for p in range(2):
        rows = set()
        for batch in _loader(tiny_config, 1, out, split="heldout", num_epochs=1,
                             process_index=p, process_count=2):
            assert batch["tokens"].shape[0] == tiny_config.train.batch_size // 2
            for d, t in zip(batch["doc_tokens"], batch["tokens"]):
                rows.add(d.tobytes() + t.tobytes())
        seen.append(rows)
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) >= n - 2 * 2  # all but the dropped partial batches


def test_global_batches_do_not_depend_on_the_process_count(built, tiny_config):
    out, _ = built

    def rows(batch):
        return {d.tobytes() + t.tobytes() for d, t in zip(batch["doc_tokens"], batch["tokens"])}

    single = _loader(tiny_config, 1, out, process_index=0, process_count=1)
    halves = [_loader(tiny_config, 1, out, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):  # crosses an epoch boundary of the small held-out world too
        assert rows(next(single)) == rows(next(halves[0])) | rows(next(halves[1]))


def test_build_summary_counts(built):
    _, summary = built
    s1 = summary["builds"]["stage1"]["splits"]["train"]
    world_rows = summary["world"]["splits"]["train"]["rows"]
    assert s1["rows"] == world_rows["stage1.jsonl"] and s1["bad_rows"] == 0
    corpus = summary["builds"]["corpus"]
    # Tiny documents are 32 tokens: every world document is chunked, and counted.
    assert corpus["docs_split_into_chunks"] == 2 * world_rows["corpus.jsonl"]
    examples = sum(s["examples"] for s in corpus["splits"].values())
    assert examples == corpus["chunks_from_split_docs"]
    chunks = pipeline.read_rows("corpus", summary["builds"]["corpus"]["out"], "train", limit=4)
    assert chunks[0].id.endswith("#0") and chunks[1].id.endswith("#1")


def test_failed_build_leaves_nothing_behind(built, tiny_config, tmp_path):
    out, _ = built
    before = sorted(os.listdir(out))
    lines = open(out / "train" / "stage2.jsonl").read().splitlines()[:5]
    bad = json.loads(lines[3])
    bad["docs"] = bad["docs"][:1]  # fewer than data.num_docs documents
    bad.pop("pos_index")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:4: field 'docs': 1 documents"):
        tfds_build.build_dataset("stage2", {"train": path}, out, tiny_config)
    assert sorted(os.listdir(out)) == before
    # Garbage in the middle of a file: same, and the existing dataset still reads.
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        tfds_build.build_dataset("stage2", {"train": path}, out, tiny_config)
    assert sorted(os.listdir(out)) == before
    assert len(pipeline.read_rows("stage2", out, "train", limit=2)) == 2
    # Too few documents is skippable too.
    path.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    summary = tfds_build.build_dataset("stage2", {"train": path}, tmp_path / "few",
                                       tiny_config, pipeline.load_data_tokenizer(out),
                                       skip_bad_rows=True)
    assert (summary["splits"]["train"]["rows"], summary["splits"]["train"]["bad_rows"]) == (4, 1)
    # With skip_bad_rows the bad line is counted and the rest is built (into a new dir).
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    new = tmp_path / "skipped"
    tok = pipeline.load_data_tokenizer(out)
    summary = tfds_build.build_dataset("stage2", {"train": path}, new, tiny_config, tok,
                                       skip_bad_rows=True)
    assert (summary["splits"]["train"]["rows"], summary["splits"]["train"]["bad_rows"]) == (5, 1)
    assert len(pipeline.read_rows("stage2", new, "train")) == 5


def test_shared_real_data_builds_and_loads(tiny_config, tmp_path):
    summary = tfds_build.build_dataset("stage1", {"train": REAL}, tmp_path, tiny_config)
    split = summary["splits"]["train"]
    assert (split["rows"], split["bad_rows"]) == (800, 0)
    assert split["examples"] == sum(len(r.questions) for _, r in
                                    formats.read_jsonl(REAL, "stage1")[0])
    assert split["docs_over_doc_max_len"] > 700  # 32-token tiny documents: counted
    batch = next(_loader(tiny_config, 1, tmp_path))
    assert batch["doc_tokens"].shape == (4, 1, 32)


def test_no_tensorflow_import(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from configs import tiny
from clara_jax.data import pipeline, tfds_build
cfg = tiny.get_config()
tfds_build.build_dataset("stage1", {{"train": {str(REAL)!r}}}, {str(tmp_path)!r}, cfg)
assert len(tfds_build.data_source("stage1", {str(tmp_path)!r}, "train")) > 0
next(pipeline.make_loader(cfg, 1, {str(tmp_path)!r}, process_index=0, process_count=1))
print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def _clara(*args, cwd=REPO):
    return es.clara("data", *args, cwd=cwd)


def test_cli_world_build_check(tmp_path):
    res = _clara("world", "--out", tmp_path / "w", "--seed", 1)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[-1])["world"]["splits"]["train"]["documents"] > 100
    res = _clara("build", "--format", "stage3", "--input",
                 f"train={tmp_path / 'w/train/stage3.jsonl'}", "--out", tmp_path / "b",
                 "--config", "configs/tiny.py", "--progress=false")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["dataset"] == "clara_stage3"
    assert "Downloading" not in res.stderr  # tfds's message for a build that downloads nothing
    assert "Generating splits" not in res.stderr and "Shuffling" not in res.stderr
    # Tiny documents are longer than doc_max_len: the warning names the option that keeps the
    # chunk holding the answer.
    assert "warning: split train:" in res.stderr
    assert "--config.data.stage_doc_chunks=answer" in res.stderr
    assert (tmp_path / "b" / "tokenizer" / "clara_tokenizer.json").exists()

    bad = tmp_path / "bad.jsonl"
    good = (tmp_path / "w/train/stage3.jsonl").read_text().splitlines()[:3]
    row = json.loads(good[1])
    row["pos_index"] = [25]
    bad.write_text("\n".join([good[0], json.dumps(row), good[2]]) + "\n")
    res = _clara("check", "--format", "stage3", bad)
    assert res.returncode == 1
    summary = json.loads(res.stdout.strip())
    assert (summary["rows"], summary["bad_rows"]) == (2, 1)
    assert "bad.jsonl:2: field 'pos_index': 25 out of range" in res.stderr
    assert set(summary["tokens_per_doc"]) >= {"p50", "p90", "p99"}
    res = _clara("check", "--format", "stage3", bad, "--skip_bad_rows",
                 "--tokenizer", tmp_path / "b" / "tokenizer", "--config", "configs/tiny.py")
    assert res.returncode == 0
    assert json.loads(res.stdout.strip())["unit"] == "tokens"


def _with_text_share(config, share):
    c = config.copy_and_resolve_references()
    c.data.text_share = share
    return c


def _contains(row: np.ndarray, ids: np.ndarray) -> bool:
    return any(np.array_equal(row[i:i + len(ids)], ids) for i in range(len(row) - len(ids) + 1))


@pytest.mark.parametrize("stage", [2, 3])
def test_text_share_all_or_none(built, tiny_config, stage):
    """data.text_share = 1: every training row reads its documents' text (the gold one's
    among them) in place of latent slots; 0: every row reads latents."""
    out, _ = built
    c = tiny_config
    k, m = c.data.num_docs, c.model.num_memory_tokens
    text = _with_text_share(c, 1.0)
    assert prompts.generator_length(text, stage) > prompts.generator_length(c, stage)
    assert prompts.generator_length(text, 1) == prompts.generator_length(c, 1)
    latent_rows = _loader(_with_text_share(c, 0.0), stage, out)
    text_rows = _loader(text, stage, out)
    docs_key, mask_key = ("doc_tokens", "doc_mask") if stage == 2 else ("cand_tokens",
                                                                        "cand_mask")
    for _ in range(3):
        a, b = next(latent_rows), next(text_rows)
        assert np.all(a["slot_mask"].sum(1) == k * m)
        assert not b["slot_mask"].any()
        assert b["tokens"].shape[1] == prompts.generator_length(text, stage)
        # The same examples, documents and answers: only the prompt differs.
        for key in ("query_tokens", "pos_index", docs_key, mask_key):
            assert np.array_equal(a[key], b[key]), key
        for i in range(b["tokens"].shape[0]):
            assert np.array_equal(a["targets"][i][a["loss_mask"][i]],
                                  b["targets"][i][b["loss_mask"][i]])
            gold = b[docs_key][i, b["pos_index"][i]][b[mask_key][i, b["pos_index"][i]]]
            assert _contains(b["tokens"][i][b["mask"][i]], gold[2:-1])  # no <ENC> BOS, EOS
    # Evaluation batches keep reading latents.
    held = next(_loader(text, stage, out, split="heldout"))
    assert np.all(held["slot_mask"].sum(1) == k * m)


def test_text_share_half_is_seeded_and_resumable(built, tiny_config):
    out, _ = built
    c = _with_text_share(tiny_config, 0.5)

    def text_flags(loader, n=12):
        return np.concatenate([~next(loader)["slot_mask"].any(1) for _ in range(n)])

    flags = text_flags(_loader(c, 2, out))
    assert 0.3 < flags.mean() < 0.7, flags.mean()
    assert np.array_equal(flags, text_flags(_loader(c, 2, out)))
    assert not np.array_equal(flags, text_flags(_loader(c, 2, out, seed=5)))
    it = _loader(c, 2, out)
    for _ in range(2):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    resumed = _loader(c, 2, out)
    resumed.set_state(json.loads(json.dumps(state)))
    for w in want:
        got = next(resumed)
        assert all(np.array_equal(got[key], w[key]) for key in w)
    # The choice follows the global index: two processes see the rows of one.
    single = _loader(c, 2, out)
    halves = [_loader(c, 2, out, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        rows = lambda b: {t.tobytes() for t in b["tokens"]}  # noqa: E731
        assert rows(next(single)) == rows(next(halves[0])) | rows(next(halves[1]))


@pytest.mark.parametrize("stage", [2, 3])
def test_text_rows_prompt_is_the_text_rag_prompt(built, tiny_config, stage):
    """A text row's prompt is what the eval's text-RAG mode builds for the same question and
    documents (`prompts.text_rag_prompt`, each document cut to what the compressor reads)."""
    out, _ = built
    c = _with_text_share(tiny_config, 1.0)
    tok = pipeline.load_data_tokenizer(out)
    feat = featurize.Featurizer.from_config(tok, c, stage)
    source = tfds_build.data_source(f"stage{stage}", out, "train")
    for i in range(8):
        ex = dict(source[i], **{featurize.TEXT_PROMPT_KEY: True})
        row = feat(ex)
        start = int(np.argmax(row["loss_mask"])) + 1  # the answer's first target follows it
        docs = featurize.as_texts(ex["docs"])
        pos = [int(p) for p in np.asarray(ex["pos_index"]).reshape(-1)]
        keep, _ = featurize.select_docs(len(docs), pos, c.data.num_docs)
        want = prompts.text_rag_prompt(tok, featurize.as_text(ex["question"]),
                                       [docs[j] for j in keep],
                                       prompts.text_doc_room(c.data.doc_max_len),
                                       c.data.question_max_len)
        assert np.array_equal(row["tokens"][:start], want)
        assert not row["slot_mask"].any() and np.all(row["mask"][:start])
        latent = feat(dict(source[i]))  # unmarked: a latent row, the same answer
        assert np.array_equal(latent["targets"][latent["loss_mask"]],
                              row["targets"][row["loss_mask"]])
