"""Batch offline evaluation: questions with gold answers (a stage-2 / stage-3 JSONL file or the
held-out world) through the RAG pipeline in one mode, scored with EM, F1, cover-EM and
Recall@1/3/5, with milliseconds per stage.

    items, info = load_items("data/world", index=pipeline.index)        # held-out stage 3
    summary = evaluate(pipeline, items, "latent", out_dir="runs/eval/latent")

`evaluate` reuses one loaded `RagPipeline` (model, tokenizer, index), so the three modes are
compared on the same weights and the same index without reloading.

Retrieval recall. A row's `pos_index` names its gold documents among its own `docs`; they are
mapped to the index's document ids through the corpus the index was built from: a gold text
equal to a corpus row's text gives that corpus id, and the relevant index ids are that id and
its chunks `ID#k` (`clara_jax.index.corpus` names long documents' chunks that way). Without a
corpus file the index's stored audit text is used instead (exact text -> id; chunked documents
then cannot match). Recall@k = 1 when any relevant id is among the first k retrieved; rows
whose gold documents map to no index id are left out of the recall means (their count is in
the summary as `recall_unmapped`).

Timing. Per batch, as `RagPipeline.run` (the path `clara ask` takes) measures it: query
encoding (the query reasoner, `RagPipeline.query_latents`), search (`index.search`),
generation (prompts, stored latents or text, the jitted generator, decoding to text). The
first batch, and the last one when it is shorter, are run once untimed (`warmup`) so that
compilation is not counted; a batch whose prompts need a new length bucket still includes
that compilation.
`ms_per_answer` is the timed wall time over the questions answered.

Processes. With several JAX processes (`clara_jax.distributed`), process p evaluates rows
p, p + P, p + 2P, ...; the per-row records are gathered to process 0
(`distributed.allgather_json`, which is also the barrier) and only process 0 writes:
OUT/predictions.jsonl (in input order), OUT/summary.json and OUT/summary.md, each to a temp
file then renamed. No shared file system is needed. The processes go in lockstep: the
search of a sharded index is a collective (each process holds its own shards,
`clara_jax.index.multihost`), so every process runs the same number of batches (one out of
rows runs empty ones, which only search) and the same warm-ups, and a batch is timed again
when it compiled on any process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from clara_jax.data.formats import DataError, iter_jsonl
from clara_jax.distributed import allgather_json
from clara_jax.eval import metrics
from clara_jax.fileio import atomic_write_text
from clara_jax.infer.generation import trace_count
from clara_jax.infer.serving import load_pipeline  # noqa: F401  (the job's loader, re-exported)

RECALL_KS = (1, 3, 5)
MODES = ("latent", "text", "closed_book")
SUMMARY_FORMAT = "clara_jax.eval_summary"


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One question to evaluate. golds: every acceptable answer; relevant: the index ids of its
    gold documents (empty: unknown, not counted in recall); hops: number of gold documents
    (pos_index entries; 0 when unknown); line: its line in the input file."""

    question: str
    golds: tuple[str, ...]
    relevant: tuple[str, ...] = ()
    hops: int = 0
    line: int = 0


# ----------------------------------------------------------------------------- input

def resolve_data(data, split: str = "heldout", fmt: str = "stage3") -> tuple[Path, Path | None]:
    """`data` is a JSONL file or a world directory (`clara data world --out DIR`: reads
    DIR/<split>/<fmt>.jsonl). Returns (the JSONL file, the corpus beside it or None)."""
    path = Path(data)
    if path.is_dir():
        path = path / split / f"{fmt}.jsonl"
    corpus = path.parent / "corpus.jsonl"
    return path, (corpus if corpus.is_file() else None)


def _text_to_ids_from_corpus(corpus: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, row in iter_jsonl(corpus, "corpus"):
        out.setdefault(row.text, []).append(row.id)
    return out


def _text_to_ids_from_index(index, live: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for doc_id, rec in zip(live, index.docs(live)):
        text = rec.get("text")
        if text:
            out.setdefault(text, []).append(doc_id)
    return out


def gold_id_mapper(index, corpus: str | os.PathLike | None = None):
    """A function gold document text -> tuple of index ids (empty when not found); see the
    module doc for the rule. `source` attribute: 'corpus:<path>' or 'index_text'. With a
    multi-process index (`clara_jax.index.multihost`) a collective: the ids, and without a
    corpus the stored texts, of every process's shards are gathered."""
    live = index.live_ids()
    if corpus is not None:
        by_text = _text_to_ids_from_corpus(Path(corpus))
        chunks: dict[str, list[str]] = {}
        for doc_id in live:
            if "#" in doc_id:
                chunks.setdefault(doc_id.rsplit("#", 1)[0], []).append(doc_id)
        live_set = set(live)

        def to_ids(text: str) -> tuple[str, ...]:
            out = []
            for cid in by_text.get(text, ()):
                out += ([cid] if cid in live_set else []) + chunks.get(cid, [])
            return tuple(out)

        to_ids.source = f"corpus:{corpus}"
        return to_ids
    by_text = _text_to_ids_from_index(index, live)

    def to_ids(text: str) -> tuple[str, ...]:
        return tuple(by_text.get(text, ()))

    to_ids.source = "index_text"
    return to_ids


def load_items(data, index=None, corpus: str | os.PathLike | None = None, fmt: str = "stage3",
               split: str = "heldout", limit: int | None = None, skip_bad_rows: bool = False
               ) -> tuple[list[EvalItem], dict]:
    """Reads a stage-2 / stage-3 file (or a world directory, see `resolve_data`) into
    EvalItems, mapping the gold documents to `index` ids when an index is given. `corpus`
    defaults to the corpus.jsonl beside the file. Returns (items, info) with info: 'data',
    'gold_ids' (the mapping's source), 'rows', 'mapped' (rows with relevant ids), 'unmapped'.
    `limit` keeps that many rows spread evenly over the file: world files are ordered by
    entity kind, so the first rows alone would be one kind's questions. Bad rows raise
    DataError naming the file, line and field."""
    if fmt not in ("stage2", "stage3"):
        raise ValueError(f"fmt={fmt!r}: must be 'stage2' or 'stage3'")
    path, beside = resolve_data(data, split, fmt)
    corpus = corpus if corpus is not None else beside
    to_ids = gold_id_mapper(index, corpus) if index is not None else None
    rows = list(iter_jsonl(path, fmt, skip_bad_rows=skip_bad_rows))
    if limit is not None and limit < len(rows):
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    items, unmapped = [], 0
    for line, row in rows:
        relevant: tuple[str, ...] = ()
        if to_ids is not None and row.pos_index:
            seen: dict[str, None] = {}
            for p in row.pos_index:
                seen.update(dict.fromkeys(to_ids(row.docs[p])))
            relevant = tuple(seen)
            unmapped += not relevant
        items.append(EvalItem(row.question, tuple(row.answers), relevant, len(row.pos_index),
                              line))
    if not items:
        raise DataError(path, 0, None, "no rows to evaluate")
    info = {"data": str(path), "gold_ids": None if to_ids is None else to_ids.source,
            "rows": len(items), "mapped": sum(bool(i.relevant) for i in items),
            "unmapped": unmapped}
    return items, info


def as_items(rows: Iterable) -> list[EvalItem]:
    """EvalItems from EvalItems, QARows (no index mapping) or dicts {'question', 'answers' |
    'answer', 'relevant'?, 'hops'?}."""
    out = []
    for n, r in enumerate(rows):
        if isinstance(r, EvalItem):
            out.append(r)
        elif isinstance(r, dict):
            golds = r.get("answers") or ([r["answer"]] if "answer" in r else None)
            if not golds:
                raise ValueError(f"row {n}: field 'answers': missing")
            out.append(EvalItem(r["question"], tuple(golds), tuple(r.get("relevant", ())),
                                int(r.get("hops", 0)), n + 1))
        else:  # a formats.QARow
            out.append(EvalItem(r.question, tuple(r.answers), (), len(r.pos_index), n + 1))
    return out


# ----------------------------------------------------------------------------- evaluation

def _score_row(item: EvalItem, prediction: str, retrieved: list[str] | None) -> dict:
    scores = metrics.answer_scores(prediction, item.golds)
    if retrieved is not None and item.relevant:
        for k in RECALL_KS:
            scores[f"recall_at_{k}"] = metrics.recall_at_k(retrieved, item.relevant, k)
    return scores


def _run_batch(pipeline, items: Sequence[EvalItem], mode: str, k: int, depth: int, rng
               ) -> tuple[list[dict], dict]:
    """Answers one batch (`RagPipeline.run`, the path `clara ask` takes too); returns (per-row
    records without scores, stage milliseconds)."""
    out = pipeline.run([it.question for it in items], mode, k, depth, rng=rng)
    records = []
    for i, it in enumerate(items):
        rec = {"line": it.line, "question": it.question, "golds": list(it.golds),
               "prediction": out.texts[i], "mode": mode, "hops": it.hops,
               "relevant": list(it.relevant)}
        if mode != "closed_book":
            rec["retrieved"] = out.ids[i]
            rec["retrieved_scores"] = [round(float(s), 6)
                                       for s in out.scores[i, :len(out.ids[i])]]
            rec["used_docs"] = k
        records.append(rec)
    return records, out.ms


def _schedule(n_items: int, proc: int, nproc: int, bs: int, warmup: bool
              ) -> tuple[list[list[int]], list[list[int]]]:
    """(warm-up batches, batches) of process `proc`: its rows proc, proc + P, ... in batches
    of `bs`; the warm-ups are the first batch and a shorter last one."""
    mine = list(range(proc, n_items, nproc))
    batches = [mine[lo:lo + bs] for lo in range(0, len(mine), bs)]
    warm = (list({len(b): b for b in (batches[0], batches[-1])}.values())
            if warmup and batches else [])
    return warm, batches


def _lockstep(n_items: int, proc: int, nproc: int, bs: int, warmup: bool
              ) -> tuple[list[list[int]], list[list[int]]]:
    """`_schedule` of this process, padded with empty batches to the longest schedule of any
    process, so that every process searches as often (the search may be a collective). Every
    process computes every schedule itself: nothing is exchanged."""
    warm, batches = _schedule(n_items, proc, nproc, bs, warmup)
    if nproc > 1:
        every = [_schedule(n_items, p, nproc, bs, warmup) for p in range(nproc)]
        warm += [[]] * (max(len(w) for w, _ in every) - len(warm))
        batches += [[]] * (max(len(b) for _, b in every) - len(batches))
    return warm, batches


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 6) if values else None


def summarize(records: list[dict], mode: str, timing: dict) -> dict:
    """The summary dict of scored per-row records (see `evaluate`)."""
    n = len(records)
    means = metrics.mean_scores(r["scores"] for r in records)
    out = {"format": SUMMARY_FORMAT, "mode": mode, "questions": n}
    for key in ("em", "f1", "cover_em"):
        out[key] = round(means[key], 6) if key in means else None
    with_gold = sum(1 for r in records if f"recall_at_{RECALL_KS[0]}" in r["scores"])
    for k in RECALL_KS:
        key = f"recall_at_{k}"
        out[key] = round(means[key], 6) if key in means else None
    out["recall_questions"] = with_gold
    out["recall_unmapped"] = sum(1 for r in records if r["hops"] and not r["relevant"]) \
        if mode != "closed_book" else 0
    timed = max(timing["timed_questions"], 1)
    out["ms_per_question"] = {stage: round(timing[stage] / timed, 3)
                              for stage in ("query_encoding", "search", "generation")}
    out["ms_per_answer"] = round(timing["wall"] / timed, 3)
    out["timed_questions"] = timing["timed_questions"]
    by_hops = {}
    for h in sorted({r["hops"] for r in records}):
        rows = [r for r in records if r["hops"] == h]
        m = metrics.mean_scores(r["scores"] for r in rows)
        by_hops[str(h)] = {"questions": len(rows), **{key: round(v, 6) for key, v in
                                                      sorted(m.items())}}
    out["by_hops"] = by_hops
    return out


def markdown_table(summaries: Sequence[dict]) -> str:
    """A Markdown table of one or more summaries (one row per mode)."""
    def cell(v, pct=True):
        if v is None:
            return "–"
        return f"{100 * v:.1f}" if pct else f"{v:.1f}"

    head = ("| mode | questions | EM | F1 | cover-EM | R@1 | R@3 | R@5 | ms query enc | "
            "ms search | ms generation | ms / answer |")
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for s in summaries:
        st = s["ms_per_question"]
        lines.append(
            f"| {s['mode']} | {s['questions']} | {cell(s['em'])} | {cell(s['f1'])} | "
            f"{cell(s['cover_em'])} | {cell(s['recall_at_1'])} | {cell(s['recall_at_3'])} | "
            f"{cell(s['recall_at_5'])} | {cell(st['query_encoding'], False)} | "
            f"{cell(st['search'], False)} | {cell(st['generation'], False)} | "
            f"{cell(s['ms_per_answer'], False)} |")
    return "\n".join(lines) + "\n"


def _environment(mesh) -> dict:
    """Versions and devices; mesh: the pipeline's serving mesh (None: not given one)."""
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices_per_process": jax.local_device_count(), "python": platform.python_version(),
            "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()}}


def _generator_traces() -> int:
    return trace_count("generate_padded") + trace_count("generate_recompute")


def _check_evaluable(pipeline, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {MODES}")
    if pipeline.settings.refine_threshold is not None:
        raise ValueError("evaluate runs without adaptive refinement; build the pipeline with "
                         "refine_threshold=None")
    if mode != "closed_book" and pipeline.index is None:
        raise ValueError(f"mode={mode!r} needs an index (or use mode='closed_book')")


def _search_depth(pipeline, mode: str, k: int) -> int:
    """Documents retrieved per question: enough for K and for every Recall@k (0: no search)."""
    if mode == "closed_book":
        return 0
    depth = min(max(k, max(RECALL_KS)), pipeline.index.num_docs)
    if depth < k:
        raise ValueError(f"num_docs={k}: the index holds only {pipeline.index.num_docs} "
                         "documents")
    return depth


def _timed_pass(pipeline, items: list, batches: list[list[int]], mode: str, k: int,
                depth: int, key_of, warmup: bool, progress: bool) -> tuple[list, dict]:
    """Answers and scores this process's `batches` (lists of row numbers into `items`);
    returns ([(row, record)], timing: milliseconds per stage, wall, timed_questions)."""
    proc, nproc = jax.process_index(), jax.process_count()
    timing = {"query_encoding": 0.0, "search": 0.0, "generation": 0.0, "wall": 0.0,
              "timed_questions": 0}
    records = []
    bar = tqdm(total=sum(map(len, batches)), unit="q", desc=f"eval {mode}", dynamic_ncols=True,
               disable=not progress or proc != 0, mininterval=1.0)
    for rows_b in batches:
        rng = key_of(rows_b)
        traced = _generator_traces()
        t = time.perf_counter()
        recs, ms = _run_batch(pipeline, [items[i] for i in rows_b], mode, k, depth, rng)
        compiled = warmup and _generator_traces() != traced
        if nproc > 1:  # again on every process, or the searches would no longer pair up
            compiled = any(allgather_json(compiled))
        if compiled:
            # The warm-up covers batch sizes, not every prompt-length bucket: a batch that had
            # to compile the generator is timed again, compiled (same key, same answers).
            t = time.perf_counter()
            recs, ms = _run_batch(pipeline, [items[i] for i in rows_b], mode, k, depth, rng)
        if not rows_b:  # an empty batch of the lockstep: nothing answered, nothing timed
            continue
        timing["wall"] += 1e3 * (time.perf_counter() - t)
        for stage, v in ms.items():
            timing[stage] += v
        timing["timed_questions"] += len(rows_b)
        for i, rec in zip(rows_b, recs):
            rec["scores"] = _score_row(items[i], rec["prediction"], rec.get("retrieved"))
            records.append((i, rec))
        bar.update(len(rows_b))
    bar.close()
    return records, timing


def _merge_processes(records: list, timing: dict) -> tuple[list[dict], dict]:
    """Every process's (row, record) pairs in row order, and the timings summed."""
    parts = allgather_json({"records": records, "timing": timing})
    merged = sorted((tuple(r) for p in parts for r in p["records"]), key=lambda r: r[0])
    total = {key: sum(p["timing"][key] for p in parts) for key in timing}
    return [r for _, r in merged], total


def evaluate(pipeline, rows: Iterable, mode: str, out_dir: str | os.PathLike | None = None,
             batch_size: int | None = None, num_docs: int | None = None, warmup: bool = True,
             progress: bool = True, seed: int = 0, extra: dict | None = None,
             return_predictions: bool = False):
    """Evaluates `rows` (EvalItems from `load_items`, or see `as_items`) with `pipeline` (a
    `clara_jax.infer.rag.RagPipeline`; `load_pipeline` builds one from paths) in `mode`.

    Sharded over JAX processes (row i on process i % P); every process returns the same merged
    summary. With `out_dir`, process 0 writes predictions.jsonl (one object per question, input
    order: line, question, golds, prediction, mode, hops, relevant, retrieved (ids, best
    first; the first `used_docs` were read), retrieved_scores (cosine), scores {em, f1,
    cover_em, recall_at_k}), summary.json and summary.md.
    batch_size: questions per batch (default the pipeline's); num_docs: K (default the
    pipeline's). Returns the summary: mode, questions, em, f1, cover_em, recall_at_{1,3,5}
    (None without retrieval or gold ids), recall_questions, ms_per_question {query_encoding,
    search, generation}, ms_per_answer, by_hops {hops: means}, num_docs, processes, ...
    With `return_predictions`, returns (summary, the per-question records in input order).
    """
    _check_evaluable(pipeline, mode)
    items = as_items(rows)
    if not items:
        raise ValueError("no rows to evaluate")
    k = int(num_docs or pipeline.settings.num_docs)
    depth = _search_depth(pipeline, mode, k)
    bs = int(batch_size or pipeline.settings.batch_size)
    # Compile outside the timed pass: the full batch's shapes and the shorter last one's.
    warm, batches = _lockstep(len(items), jax.process_index(), jax.process_count(), bs, warmup)
    base_key = jax.random.key(seed)
    # Keyed by the batch's first global row (sampling only; greedy decoding ignores it).
    key_of = lambda rows_b: jax.random.fold_in(base_key, rows_b[0] if rows_b else 0)
    for rows_b in warm:
        _run_batch(pipeline, [items[i] for i in rows_b], mode, k, depth, key_of(rows_b))
    records, timing = _timed_pass(pipeline, items, batches, mode, k, depth, key_of, warmup,
                                  progress)
    all_records, total = _merge_processes(records, timing)
    summary = summarize(all_records, mode, total)
    summary.update(num_docs=k if mode != "closed_book" else 0, search_depth=depth,
                   batch_size=bs, backend=pipeline.settings.backend,
                   processes=jax.process_count(),
                   max_new_tokens=pipeline.settings.max_new_tokens, warmup=warmup,
                   environment=_environment(pipeline.mesh), **(extra or {}))
    if out_dir is not None and jax.process_index() == 0:
        write_outputs(out_dir, all_records, summary)
    return (summary, all_records) if return_predictions else summary


def write_outputs(out_dir, records: list[dict], summary: dict) -> None:
    """OUT/predictions.jsonl, OUT/summary.json, OUT/summary.md, each atomically."""
    out = Path(out_dir)
    atomic_write_text(out / "predictions.jsonl",
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", markdown_table([summary]))
