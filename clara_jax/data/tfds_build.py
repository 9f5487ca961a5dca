"""TFDS builders (array_record files, no TensorFlow) for the four formats, and the build job.

`build_dataset` reads and validates the input JSONL files completely before it writes anything,
tokenises with the project tokenizer to count truncations (and to chunk corpus documents longer
than data.doc_max_len, with data.chunk_overlap tokens of overlap), builds the dataset in a
temporary directory and only then moves it into OUT. Layout of OUT:
  OUT/clara_<format>/1.0.0/...         the TFDS dataset (splits as given)
  OUT/clara_<format>.summary.json     counts, truncations, token statistics, build time
  OUT/tokenizer/                      the tokenizer (given, found in OUT, or trained here)

Datasets store text; tokenisation happens in the grain pipeline (`clara_jax.data.pipeline`).
Stage-1 rows are flattened at build time into one example per (document, QA pair) and one per
paraphrase, so that a batch has a fixed number of generator sequences.

Stage documents longer than data.doc_max_len are stored whole and cut to doc_max_len tokens in
the pipeline, unless data.stage_doc_chunks="answer": then each is stored as one of the chunks
the corpus build (and the index) splits it into, the one that holds the example's answer
(`_StageChunker`), so that a row whose answer lies past the first chunk still trains on a
document that contains it, as the generator reads the index's chunks at inference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from clara_jax.data import formats
from clara_jax.data.formats import DataError, QARow, ReadStats, Stage1Row, document_chunks
from clara_jax.data.prompts import DOC_FRAME, PARAPHRASE_QUESTION, template_texts
from clara_jax.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    check_tokenizer_fits,
    load_tokenizer,
    saved_digest,
    tokenizer_digest,
)
from clara_jax.workdir import clean_stale_builds, lock

VERSION = "1.0.0"
TOKENIZER_DIR = "tokenizer"


def dataset_name(fmt: str) -> str:
    return f"clara_{fmt}"


def _text():
    return tfds.features.Text()


class _ClaraBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes pre-validated examples given as {split: [example dict]}; read-only when built
    without examples (as `tfds.data_source` does)."""

    VERSION = tfds.core.Version(VERSION)
    FEATURES: dict = {}
    DESCRIPTION = ""

    def __init__(self, *, examples: dict[str, list[dict]] | None = None, **kwargs):
        self._examples = examples
        super().__init__(**kwargs)

    def _info(self):
        # disable_shuffling keeps the input order: evaluation reads rows back in file order.
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=tfds.features.FeaturesDict(self.FEATURES),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._examples is None:
            raise RuntimeError(f"{self.name}: build it with clara_jax.data.tfds_build."
                               "build_dataset")
        return {split: self._generate_examples(rows) for split, rows in self._examples.items()}

    def _generate_examples(self, rows):
        yield from enumerate(rows)


class ClaraStage1(_ClaraBuilder):
    DESCRIPTION = ("Stage-1 (compressor pretraining) examples: one per (document, QA pair) and "
                   "one per paraphrase; `line` is the source JSONL line.")
    FEATURES = {"data_type": _text(), "question": _text(), "answer": _text(), "doc": _text(),
                "line": np.int64, "pair": np.int32}


class ClaraStage2(_ClaraBuilder):
    DESCRIPTION = "Stage-2 (instruction tuning) rows: question, documents, answer."
    FEATURES = {"question": _text(), "docs": tfds.features.Sequence(_text()),
                "answer": _text(), "answers": tfds.features.Sequence(_text()),
                "pos_index": tfds.features.Sequence(np.int32), "line": np.int64}


class ClaraStage3(_ClaraBuilder):
    DESCRIPTION = "Stage-3 (end-to-end) rows: question, candidates, pos_index, answer."
    FEATURES = dict(ClaraStage2.FEATURES)


class ClaraCorpus(_ClaraBuilder):
    DESCRIPTION = ("Corpus chunks: documents longer than data.doc_max_len are split into "
                   "overlapping chunks; `chunk` of `num_chunks`.")
    FEATURES = {"id": _text(), "title": _text(), "text": _text(), "chunk": np.int32,
                "num_chunks": np.int32, "line": np.int64}


BUILDERS = {"stage1": ClaraStage1, "stage2": ClaraStage2, "stage3": ClaraStage3,
            "corpus": ClaraCorpus}


def builder_for(fmt: str, data_dir, examples=None) -> _ClaraBuilder:
    cls = BUILDERS[fmt]
    return cls(examples=examples, data_dir=str(data_dir), file_format="array_record")


# ----------------------------------------------------------------------------- rows -> examples


class _StageChunker:
    """Stage documents as the index's chunks (data.stage_doc_chunks="answer"): a document longer
    than `room` tokens is split into exactly the windows the corpus build uses
    (`formats.document_chunks`, data.chunk_overlap) and stands in the example as the text of
    one chunk; shorter documents are kept as they are. Counts per stored document (an example's
    document, so a document in several examples is counted in each) go into `counts`, the
    split's summary keys:
      docs_chunked                  documents replaced by one of their chunks
      docs_chunk_by_answer          of those that looked for the answer, the ones that found it
      docs_answer_past_first_chunk  ... in a chunk after the first (truncation would have lost it)
      docs_answer_not_found         ... that did not find it and took the first chunk
      paraphrase_docs_truncated     stage-1 paraphrase documents kept whole (cut in the pipeline)
    """

    def __init__(self, tok: Tokenizer, room: int, overlap: int, counts: dict):
        self.tok, self.room, self.overlap, self.counts = tok, room, overlap, counts
        for key in ("docs_chunked", "docs_chunk_by_answer", "docs_answer_past_first_chunk",
                    "docs_answer_not_found", "paraphrase_docs_truncated"):
            counts.setdefault(key, 0)
        self._chunks: dict[str, list[str]] = {}  # documents recur across rows: encoded once

    def chunks(self, doc: str) -> list[str]:
        if doc not in self._chunks:
            self._chunks[doc] = [text for _, text in document_chunks(
                doc, self.tok.encode(doc), self.tok, self.room, self.overlap)]
        return self._chunks[doc]

    def first(self, doc: str) -> str:
        """The first chunk: the same tokens truncation keeps, the text the index holds."""
        chunks = self.chunks(doc)
        self.counts["docs_chunked"] += len(chunks) > 1
        return chunks[0]

    def with_answer(self, doc: str, answers: Iterable[str]) -> str:
        """The first chunk whose text holds an answer (case-insensitive substring), trying the
        answers in order (the training answer first), else the first chunk."""
        chunks = self.chunks(doc)
        if len(chunks) == 1:
            return chunks[0]
        self.counts["docs_chunked"] += 1
        folded = [c.casefold() for c in chunks]
        for answer in answers:
            want = answer.strip().casefold()
            for k, text in enumerate(folded):
                if want and want in text:
                    self.counts["docs_chunk_by_answer"] += 1
                    self.counts["docs_answer_past_first_chunk"] += k > 0
                    return chunks[k]
        self.counts["docs_answer_not_found"] += 1
        return chunks[0]

    def paraphrase(self, doc: str) -> str:
        """A paraphrase restates its whole document: kept whole, and so cut in the pipeline."""
        self.counts["paraphrase_docs_truncated"] += len(self.chunks(doc)) > 1
        return doc


def _stage1_examples(rows: Iterable[tuple[int, Stage1Row]],
                     chunker: _StageChunker | None = None) -> list[dict]:
    """One example per (document, QA pair) and one per paraphrase. With a `chunker`, each QA
    example's document is the chunk holding that pair's answer."""
    out = []
    for line, row in rows:
        doc = row.docs[0]
        if row.data_type == "paraphrase":
            out.append({"data_type": "paraphrase", "question": PARAPHRASE_QUESTION,
                        "answer": row.answers[0],
                        "doc": chunker.paraphrase(doc) if chunker else doc,
                        "line": line, "pair": 0})
            continue
        for i, (q, a) in enumerate(zip(row.questions, row.answers)):
            out.append({"data_type": "qa", "question": q, "answer": a,
                        "doc": chunker.with_answer(doc, [a]) if chunker else doc,
                        "line": line, "pair": i})
    return out


def _qa_examples(rows: Iterable[tuple[int, QARow]],
                 chunker: _StageChunker | None = None) -> list[dict]:
    """Stage-2/3 examples. With a `chunker`, the gold documents (`pos_index`) are the chunk
    holding `answer`, else one of `answers`; the other documents (every document of a row
    without `pos_index`) take their first chunk, the same tokens truncation keeps."""
    def docs(r: QARow) -> list[str]:
        if chunker is None:
            return list(r.docs)
        answers = list(dict.fromkeys((r.answer, *r.answers)))
        gold = set(r.pos_index)
        return [chunker.with_answer(d, answers) if i in gold else chunker.first(d)
                for i, d in enumerate(r.docs)]

    return [{"question": r.question, "docs": docs(r), "answer": r.answer,
             "answers": list(r.answers), "pos_index": list(r.pos_index), "line": line}
            for line, r in rows]


def _corpus_examples(rows, tok: Tokenizer, room: int, overlap: int, counts: dict) -> list[dict]:
    out = []
    counts.update(docs_split=0, chunks_from_splits=0)
    for line, r in rows:
        chunks = document_chunks(r.text, tok.encode(r.text), tok, room, overlap)
        if len(chunks) > 1:
            counts["docs_split"] += 1
            counts["chunks_from_splits"] += len(chunks)
        for k, (_, text) in enumerate(chunks):
            out.append({"id": r.id, "title": r.title, "text": text, "chunk": k,
                        "num_chunks": len(chunks), "line": line})
    return out


def _to_examples(fmt, rows, tok, config, counts) -> list[dict]:
    """The examples of one split's rows; `counts` (the split's) gets the chunking counts."""
    room = int(config.data.doc_max_len) - DOC_FRAME
    overlap = int(config.data.chunk_overlap)
    if fmt == "corpus":
        return _corpus_examples(rows, tok, room, overlap, counts)
    chunker = (_StageChunker(tok, room, overlap, counts)
               if config.data.stage_doc_chunks == "answer" else None)
    if fmt == "stage1":
        return _stage1_examples(rows, chunker)
    return _qa_examples(rows, chunker)


# ----------------------------------------------------------------------------- summary


def _percentiles(values) -> dict[str, float]:
    if len(values) == 0:
        return {}
    a = np.asarray(values, np.float64)
    return {"min": float(a.min()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "mean": round(float(a.mean()), 2)}


def token_stats(fmt: str, rows, tok: Tokenizer | None, config=None) -> dict:
    """Token statistics of parsed rows: tokens per document (unique documents), question and
    answer lengths and, given a config, how many of each exceed the configured lengths.
    Without a tokenizer, whitespace-separated words are counted instead."""
    count = (lambda texts: [len(x) for x in tok.encode_batch(texts)]) if tok else \
        (lambda texts: [len(t.split()) for t in texts])
    docs, questions, answers, paraphrases = {}, [], [], []
    for _, r in rows:
        for d in formats.doc_texts(r):
            docs.setdefault(d, None)
        if isinstance(r, Stage1Row) and r.data_type == "paraphrase":
            paraphrases += list(r.answers[:1])
        elif isinstance(r, Stage1Row):
            questions += list(r.questions)
            answers += list(r.answers)
        elif isinstance(r, QARow):
            questions.append(r.question)
            answers.append(r.answer)
    doc_lens = count(list(docs))
    out = {"unit": "tokens" if tok else "words", "unique_docs": len(doc_lens),
           "tokens_per_doc": _percentiles(doc_lens)}
    if questions:
        out["tokens_per_question"] = _percentiles(count(questions))
    if answers:
        out["tokens_per_answer"] = _percentiles(count(answers))
    if paraphrases:
        out["tokens_per_paraphrase"] = _percentiles(count(paraphrases))
    if tok is not None and config is not None:
        room = int(config.data.doc_max_len) - DOC_FRAME
        out["docs_over_doc_max_len"] = int(sum(n > room for n in doc_lens))
        if questions:
            qmax = int(config.data.question_max_len)
            out["questions_truncated"] = int(sum(n > qmax for n in count(questions)))
        # A target keeps its length cap - 1 tokens (plus EOS); " " for its leading space.
        for key, texts, cap in (("answers_truncated", answers, "answer_max_len"),
                                ("paraphrases_truncated", paraphrases, "paraphrase_max_len")):
            if texts:
                room = int(config.data[cap]) - 1
                out[key] = int(sum(n > room for n in count([" " + t for t in texts])))
    return out


# (summary key, what is cut, the config field that sets the length)
_TRUNCATIONS = (("questions_truncated", "questions", "data.question_max_len"),
                ("answers_truncated", "answers", "data.answer_max_len"),
                ("paraphrases_truncated", "paraphrases", "data.paraphrase_max_len"))


def truncation_warnings(summary: dict) -> list[str]:
    """One line per kind of text a build cuts (or, for a corpus, splits) with the count and
    the flag to raise, from `build_dataset`'s summary; the summary alone is easy to miss.
    For stage formats the documents' line names data.stage_doc_chunks too: with "truncate",
    that "answer" keeps the chunk holding the answer; with "answer", how many found it."""
    out = []
    for split, s in summary["splits"].items():
        for key, what, field in _TRUNCATIONS:
            if s.get(key):
                out.append(f"split {split}: {s[key]} {what} are longer than {field} and will be "
                           f"cut (raise --config.{field})")
        docs = s.get("docs_over_doc_max_len")
        if not docs:
            continue
        head = (f"split {split}: {docs} of {s['unique_docs']} documents are longer than "
                "data.doc_max_len and are")
        if summary["format"] == "corpus":
            out.append(f"{head} split into chunks of data.doc_max_len tokens (raise "
                       "--config.data.doc_max_len)")
        elif summary.get("stage_doc_chunks", "truncate") == "answer":
            para = s.get("paraphrase_docs_truncated", 0)
            out.append(
                f"{head} stored as one of their chunks (data.stage_doc_chunks=answer); of the "
                "examples' documents that look for the answer, "
                f"{s.get('docs_chunk_by_answer', 0)} took the chunk holding it "
                f"({s.get('docs_answer_past_first_chunk', 0)} past the first chunk) and "
                f"{s.get('docs_answer_not_found', 0)} did not find it and took the first chunk"
                + (f"; {para} paraphrase documents are cut to data.doc_max_len tokens"
                   if para else "") + " (raise --config.data.doc_max_len)")
        else:
            out.append(f"{head} cut to data.doc_max_len tokens, which may cut off the answer "
                       "(pass --config.data.stage_doc_chunks=answer to keep the chunk that "
                       "holds it, as the index splits documents, or raise "
                       "--config.data.doc_max_len)")
    return out


def _doc_count_issues(fmt: str, rows, config) -> dict:
    """Rows whose document count differs from what a batch takes (counted, handled in the
    pipeline: stage 1 uses the first document; stages 2/3 keep the gold documents first)."""
    out = {}
    if fmt == "stage1":
        out["stage1_extra_docs_ignored"] = int(sum(len(r.docs) > 1 for _, r in rows))
    elif fmt in ("stage2", "stage3"):
        want = int(config.data.num_docs if fmt == "stage2" else config.data.num_candidates)
        out[f"rows_with_more_than_{want}_docs"] = int(sum(len(r.docs) > want for _, r in rows))
    return out


def _check_doc_counts(fmt: str, rows, config, path, skip_bad_rows: bool, stats: ReadStats):
    """Rows of stages 2/3 need at least K (C) documents; returns the rows that have them."""
    if fmt not in ("stage2", "stage3"):
        return rows
    field = "data.num_docs" if fmt == "stage2" else "data.num_candidates"
    want = int(config.data.num_docs if fmt == "stage2" else config.data.num_candidates)
    kept = []
    for line, r in rows:
        if len(r.docs) >= want:
            kept.append((line, r))
            continue
        err = DataError(path, line, "docs", f"{len(r.docs)} documents, but config.{field}="
                        f"{want} are needed per row")
        if not skip_bad_rows:
            raise err
        stats.rows -= 1
        stats.add_error(err)
    return kept


# ----------------------------------------------------------------------------- the build job


def train_tokenizer_for(texts: list[str], config) -> SentencePieceTokenizer:
    """The project SentencePiece model for `config` (vocab_size, M, seed from the config)."""
    return SentencePieceTokenizer.train(texts, int(config.model.vocab_size),
                                        int(config.model.num_memory_tokens),
                                        seed=int(config.train.seed),
                                        extra_texts=template_texts())


def corpus_texts(rows) -> list[str]:
    """Every text of parsed rows (documents, questions, answers), for tokenizer training."""
    texts = []
    for _, r in rows:
        texts += formats.doc_texts(r)
        if isinstance(r, Stage1Row):
            texts += list(r.questions) + list(r.answers)
        elif isinstance(r, QARow):
            texts += [r.question, *r.answers]
    return list(dict.fromkeys(texts))


def build_dataset(fmt: str, inputs: dict[str, str | os.PathLike], out: str | os.PathLike,
                  config, tokenizer: Tokenizer | None = None, skip_bad_rows: bool = False,
                  progress: bool = True, replace_tokenizer: bool = False) -> dict:
    """Builds OUT/clara_<fmt> from {split: jsonl path}; returns the build summary.

    Nothing is written to OUT unless every input reads cleanly (or `skip_bad_rows`). A given
    `tokenizer` that differs from the one already in OUT/tokenizer (OUT's other datasets and
    the runs trained on them use that one) is refused unless `replace_tokenizer`. Without
    `progress`, TFDS's bars ("Generating splits", "Shuffling") are off for the build; TFDS
    has one switch for the whole process, which is on again afterwards.
    """
    if fmt not in BUILDERS:
        raise ValueError(f"unknown format {fmt!r}; known: {tuple(BUILDERS)}")
    if not inputs:
        raise ValueError("no input files")
    start = time.perf_counter()
    out = Path(out)
    split_rows, read_stats = {}, {}
    for split, path in inputs.items():
        stats = ReadStats()
        rows = list(formats.iter_jsonl(path, fmt, skip_bad_rows, stats))
        split_rows[split] = _check_doc_counts(fmt, rows, config, path, skip_bad_rows, stats)
        read_stats[split] = stats
        if fmt == "corpus":
            formats.check_unique_ids(split_rows[split], path)
    if all(not rows for rows in split_rows.values()):
        raise DataError(next(iter(inputs.values())), 0, None, "no valid rows")

    tok_dir = out / TOKENIZER_DIR
    trained, given = False, tokenizer is not None
    have_tok = (tok_dir / "clara_tokenizer.json").exists()
    if tokenizer is None and have_tok:
        tokenizer = load_tokenizer(tok_dir)
    elif have_tok and not replace_tokenizer and (
            tokenizer_digest(tokenizer) != saved_digest(tok_dir)):
        raise DataError(tok_dir, 0, None, "holds another tokenizer, the one this directory's "
                        "datasets were built with; pass --replace_tokenizer to build with the "
                        "given one (then rebuild the other datasets here), or use another --out")
    if tokenizer is None:
        train_split = "train" if "train" in split_rows else next(iter(split_rows))
        tokenizer = train_tokenizer_for(corpus_texts(split_rows[train_split]), config)
        trained = True
    check_tokenizer_fits(tokenizer, config)

    counts = {s: {} for s in split_rows}
    examples = {s: _to_examples(fmt, rows, tokenizer, config, counts[s])
                for s, rows in split_rows.items()}

    out.mkdir(parents=True, exist_ok=True)
    # One writer per data dir, and nothing created in OUT before the inputs read cleanly.
    with lock(out, "clara data build"):
        clean_stale_builds(out)
        return _write_build(fmt, inputs, out, config, tokenizer, progress, examples, counts,
                            split_rows, read_stats, trained, given, start)


def _write_build(fmt, inputs, out: Path, config, tokenizer, progress, examples, counts,
                 split_rows, read_stats, trained, given, start) -> dict:
    name = dataset_name(fmt)
    tok_dir = out / TOKENIZER_DIR
    tmp = out / f".{name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # tfds prints "Downloading and preparing dataset ..." to stdout although nothing is
    # downloaded (and stdout carries the one-line JSON summary): kept, and shown only when
    # the build fails.
    tfds_said = io.StringIO()
    tfds.display_progress_bar(progress)
    try:
        builder = builder_for(fmt, tmp, examples)
        with contextlib.redirect_stdout(tfds_said):
            builder.download_and_prepare(
                download_dir=str(tmp / "downloads"),
                download_config=tfds.download.DownloadConfig(verify_ssl=False),
            )
        final = out / name
        old = out / f".{name}.old-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp / name, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        sys.stderr.write(tfds_said.getvalue())
        raise
    finally:
        tfds.display_progress_bar(True)
        shutil.rmtree(tmp, ignore_errors=True)

    if trained or given:
        # The loader tokenises with OUT/tokenizer: keep it the one this build was made with.
        tokenizer.save(tok_dir)
    summary = {
        "format": fmt, "dataset": name, "out": str(out),
        "splits": {s: {"file": str(inputs[s]), "rows": read_stats[s].rows,
                       "bad_rows": read_stats[s].bad_rows, "examples": len(examples[s]),
                       "errors": read_stats[s].errors[:5],
                       **token_stats(fmt, split_rows[s], tokenizer, config),
                       **_doc_count_issues(fmt, split_rows[s], config),
                       **(counts[s] if fmt != "corpus" else {})}
                   for s in split_rows},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "trained_here": trained},
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    if fmt == "corpus":
        summary["docs_split_into_chunks"] = sum(c["docs_split"] for c in counts.values())
        summary["chunks_from_split_docs"] = sum(c["chunks_from_splits"] for c in counts.values())
    else:
        summary["stage_doc_chunks"] = str(config.data.stage_doc_chunks)
    text = json.dumps(summary, indent=2) + "\n"
    summary_path = out / f"{name}.summary.json"
    tmp_summary = out / f".{name}.summary.json.tmp"
    tmp_summary.write_text(text)
    os.replace(tmp_summary, summary_path)
    return summary


def data_source(fmt: str, data_dir, split: str = "train"):
    """The built split as a random-access source (`tfds.data_source`, array_record)."""
    path = Path(data_dir) / dataset_name(fmt)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset; build it with `clara data build "
                                f"--format {fmt} ... --out {data_dir}`")
    # The class must be importable by name for tfds' registry; it is (defined above).
    return tfds.data_source(dataset_name(fmt), data_dir=str(data_dir), split=split,
                            builder_kwargs={"file_format": "array_record"})
