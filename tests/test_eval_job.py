"""The batch evaluation job (clara_jax/eval/job.py, `clara eval`) on the tiny model, the
bundled world's held-out split and a real latent index: gold documents mapped to index ids,
metrics recomputed from the written predictions, predictions equal to the RAG pipeline's own
answers, and the two-process run (launch/local_multiprocess.sh) merged into the single-process
result."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clara_jax.data.formats import DataError
from clara_jax.eval import metrics
from clara_jax.eval.job import RECALL_KS, evaluate, load_items, load_pipeline
from tests import eval_support as es

LIMIT = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_params):
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.model import ModelConfig

    root = tmp_path_factory.mktemp("evaljob")
    config = es.fresh_config(root / "world")
    world_dir = es.write_world(root, config)
    params = es.perturbed(tiny_params)
    es.save_checkpoint(config, params, root / "run")
    tok = load_tokenizer(world_dir / "tokenizer")
    es.build_corpus_index(root / "idx", world_dir / "heldout" / "corpus.jsonl", config,
                          ModelConfig.from_config(config), params, tok)
    return root


@pytest.fixture(scope="module")
def pipeline(setup):
    return load_pipeline(checkpoint=setup / "run", index=setup / "idx", batch_size=4,
                         backend="exact")


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_gold_documents_map_to_index_ids(setup, pipeline):
    root, index = setup, pipeline.index
    items, info = load_items(root / "world", index)
    rows = _jsonl(root / "world" / "heldout" / "stage3.jsonl")
    corpus = {r["text"]: r["id"] for r in _jsonl(root / "world" / "heldout" / "corpus.jsonl")}
    assert info["rows"] == len(rows) == len(items) and info["unmapped"] == 0
    assert info["gold_ids"].startswith("corpus:")
    live = set(index.ids)
    for item, row in zip(items, rows):
        assert item.question == row["question"] and item.golds == (row["answer"],)
        assert item.hops == len(row["pos_index"]) and item.line == rows.index(row) + 1
        gold = {corpus[row["docs"][p]] for p in row["pos_index"]}
        # Every chunk of every gold document, and nothing else.
        want = {i for i in live if i.split("#")[0] in gold}
        assert set(item.relevant) == want and want
    # Without a corpus file the index's stored text is matched exactly (one chunk each here).
    ids = index.ids[:3]
    texts = [index.doc(i)["text"] for i in ids]
    f = root / "alone" / "stage3.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps({"question": f"q{n}", "docs": [texts[n], "no such text"],
                                     "pos_index": [0], "answer": "a"}) + "\n"
                         for n in range(3)))
    items, info = load_items(f, index)
    assert info["gold_ids"] == "index_text"
    assert [it.relevant for it in items] == [(i,) for i in ids]
    # A bad row names the file, the line and the field.
    f.write_text(f.read_text() + json.dumps({"question": "", "docs": ["x"], "answer": "a"}))
    with pytest.raises(DataError, match=r"stage3.jsonl:4: field 'question'"):
        load_items(f, index)


def test_limit_spreads_the_sample_over_the_file(setup, pipeline):
    every, _ = load_items(setup / "world", pipeline.index)
    some, info = load_items(setup / "world", pipeline.index, limit=5)
    n = len(every)
    assert info["rows"] == 5 and [i.line for i in some] == [every[k * n // 5].line
                                                          for k in range(5)]
    assert some[0].line == 1 and some[-1].line > n // 2


def test_three_modes_score_the_pipelines_answers(setup, pipeline):
    root = setup
    items, _ = load_items(root / "world", pipeline.index, limit=LIMIT)
    questions = [it.question for it in items]
    k = pipeline.settings.num_docs
    top = pipeline.index.search(pipeline.query_latents(questions), max(RECALL_KS), "exact")
    summaries = {}
    for mode in ("latent", "text", "closed_book"):
        out = root / "eval" / mode
        summary = evaluate(pipeline, items, mode, out_dir=out, progress=False)
        summaries[mode] = summary
        preds = _jsonl(out / "predictions.jsonl")
        assert json.loads((out / "summary.json").read_text()) == summary
        assert f"| {mode} | {LIMIT} |" in (out / "summary.md").read_text()
        assert [p["line"] for p in preds] == [it.line for it in items]
        # The predictions are the RAG pipeline's own answers (same retrieval, same decoding).
        answers, _ = pipeline.answer(questions, mode=mode)
        assert [p["prediction"] for p in preds] == [a.answer for a in answers]
        # Metrics recomputed here from the written predictions.
        for key, fn in (("em", metrics.exact_match), ("f1", metrics.f1_score),
                        ("cover_em", metrics.cover_exact_match)):
            want = np.mean([fn(p["prediction"], p["golds"]) for p in preds])
            assert summary[key] == pytest.approx(want, abs=1e-6)
        assert summary["questions"] == LIMIT and summary["processes"] == 1
        assert summary["ms_per_answer"] > 0 and summary["ms_per_question"]["generation"] > 0
        if mode == "closed_book":
            assert all("retrieved" not in p for p in preds)
            assert summary["recall_at_5"] is None
            assert summary["ms_per_question"]["query_encoding"] == 0
            continue
        for i, p in enumerate(preds):
            assert p["retrieved"] == top.ids[i] and p["used_docs"] == k
            assert p["retrieved"][:k] == answers[i].doc_ids
            np.testing.assert_allclose(p["retrieved_scores"], top.scores[i], atol=1e-5)
        for r in RECALL_KS:
            want = np.mean([any(d in p["relevant"] for d in p["retrieved"][:r]) for p in preds])
            assert summary[f"recall_at_{r}"] == pytest.approx(want, abs=1e-6)
        assert summary["recall_questions"] == LIMIT
        hops = {str(h): sum(it.hops == h for it in items) for h in (1, 2)}
        assert {h: v["questions"] for h, v in summary["by_hops"].items()} == \
            {h: n for h, n in hops.items() if n}
    # Retrieval does not depend on how the documents are then read.
    assert summaries["latent"]["recall_at_5"] == summaries["text"]["recall_at_5"]


COMMON = ["--limit=7", "--batch_size=3", "--backend=exact", "--noprogress"]


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """`clara eval` of the plain index as one process: (its stdout, OUT)."""
    root, out = setup, tmp_path_factory.mktemp("one_process") / "one"
    one = es.clara("eval", f"--checkpoint={root / 'run'}", f"--index={root / 'idx'}",
                   f"--data={root / 'world'}", *COMMON, f"--out={out}")
    assert one.returncode == 0, one.stderr[-3000:]
    return one.stdout, out


def _two_processes(setup, index, out, logs):
    root = setup
    return es.clara("eval", f"--checkpoint={root / 'run'}", f"--index={index}",
                    f"--data={root / 'world'}", *COMMON, f"--out={out}",
                    launcher=[str(es.REPO / "launch" / "local_multiprocess.sh"), "2",
                              "--logdir", str(logs), "--"])


def _same_evaluation(one_dir, two_dir):
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one_dir, two_dir))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert _jsonl(one_dir / "predictions.jsonl") == _jsonl(two_dir / "predictions.jsonl")
    for key in ("questions", "em", "f1", "cover_em", "recall_at_1", "recall_at_3",
                "recall_at_5", "by_hops"):
        assert a[key] == b[key]
    return a


def test_cli_two_processes_merge_to_the_single_process_result(setup, one_process, tmp_path):
    root = setup
    # 7 rows over 2 processes in batches of 3: process 0 runs 2 batches (3 + 1 rows), process
    # 1 one batch and one empty batch, in lockstep.
    two = _two_processes(setup, root / "idx", tmp_path / "two", tmp_path / "logs")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    stdout, one_dir = one_process
    a = _same_evaluation(one_dir, tmp_path / "two")
    assert json.loads(stdout.strip().splitlines()[-1]) == a
    # Bad input: exit status 2 and the reason in one line.
    bad = es.clara("eval", f"--checkpoint={root / 'run'}", f"--index={root / 'idx'}",
                   f"--data={tmp_path / 'missing.jsonl'}", f"--out={tmp_path / 'x'}")
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_cli_two_processes_on_a_sharded_index_each_searching_its_own_shard(
        setup, one_process, tmp_path):
    """The index split into 2 shards (rows in order: the first half, then the second, so the
    index order and its ties are the plain index's), evaluated by 2 processes, each opening
    only its own shard (clara_jax/index/multihost.py): every prediction, retrieved id and
    score is the one process's over the plain index."""
    from clara_jax.index import IndexBuilder, LatentIndex, shard_dir_name

    whole = LatentIndex.open(setup / "idx")
    sharded = tmp_path / "idx_sharded"
    n = whole.store.num_rows
    for s, rows in enumerate((np.arange(n // 2), np.arange(n // 2, n))):
        b = IndexBuilder(sharded / shard_dir_name(s, 2), whole.identity, dtype=whole.store.dtype,
                         key=whole.key, chunk_size=len(rows))
        recs = [whole.store.doc(int(r)) for r in rows]
        b.write_chunk(0, whole.store.read_rows(rows), [r["id"] for r in recs],
                      [r.get("title") for r in recs], [r.get("text") for r in recs])
        b.finalize(1, scann=False)
    two = _two_processes(setup, sharded, tmp_path / "two", tmp_path / "logs")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    _same_evaluation(one_process[1], tmp_path / "two")


def test_a_batch_that_compiles_is_timed_again(setup, pipeline, monkeypatch):
    """The warm-up compiles the batch sizes; a later batch whose prompts fall in a new length
    bucket compiles inside the loop, and is then run again so that its time is the compiled
    one. The compile is signalled by the generator's trace counter, bumped here for the third
    batch's first run. Answers are unchanged."""
    from clara_jax.eval import job
    from clara_jax.infer import generation

    items, _ = load_items(setup / "world", pipeline.index, limit=LIMIT)
    calls = []
    run = job._run_batch

    def counting(pipe, batch_items, *args):
        out = run(pipe, batch_items, *args)
        line = batch_items[0].line
        if line == items[4].line and line not in calls:
            generation.TRACE_COUNTS["generate_padded"] += 1
        calls.append(line)
        return out

    monkeypatch.setattr(job, "_run_batch", counting)
    _, preds = evaluate(pipeline, items, "closed_book", batch_size=2, progress=False,
                        return_predictions=True)
    batches = [items[i].line for i in range(0, LIMIT, 2)]
    # One warm-up (every batch has 2 rows), then each batch once, the third one twice.
    assert calls == [batches[-1]] + batches[:3] + [batches[2]] + batches[3:]
    answers, _ = pipeline.answer([it.question for it in items], mode="closed_book")
    assert [p["prediction"] for p in preds] == [a.answer for a in answers]
