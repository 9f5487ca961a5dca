"""Readers for the reference JSONL formats (apple/ml-clara) and a plain corpus.

One JSON object per line:
  stage1  {"data_type": "qa", "question": [str], "answers": [str], "docs": [str]}
          {"data_type": "paraphrase", "question": "" (ignored), "answers": [str], "docs": [str]}
  stage2  {"question": str, "docs": [str], "gold_answer": str, "answer": str}
          (`pos_index` optional: the gold documents' indices)
  stage3  {"question": str, "docs": [str] (candidates), "pos_index": int | [int],
           "answer": str | "answers": [str] | "golden_answers": [str]}
  corpus  {"id": str | int, "title": str (optional), "text": str}

As in the reference reader, `docs` may also be spelled `context` or `content`, a missing
`data_type` means "qa", and the training answer is `answer` (str), else the first of `answers`,
else the first of `golden_answers`, else `gold_answer`. Every answer string given is kept in
`answers` (for evaluation).

Bad rows raise `DataError("FILE:LINE: field 'F': why")`; with `skip_bad_rows` they are counted
in `ReadStats` and skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("stage1", "stage2", "stage3", "corpus")
STAGE_FORMAT = {1: "stage1", 2: "stage2", 3: "stage3"}


class DataError(ValueError):
    """A bad input row; the message names the file, the line and the field."""

    def __init__(self, path, line: int, field_name: str | None, why: str):
        self.path, self.line, self.field, self.why = str(path), line, field_name, why
        where = f"{path}:{line}" if line else f"{path}"
        what = f" field {field_name!r}:" if field_name else ""
        super().__init__(f"{where}:{what} {why}")


@dataclass(frozen=True)
class Stage1Row:
    data_type: str  # "qa" or "paraphrase"
    questions: tuple[str, ...]  # empty for paraphrase rows
    answers: tuple[str, ...]  # the QA answers, or (paraphrase,) for paraphrase rows
    docs: tuple[str, ...]


@dataclass(frozen=True)
class QARow:
    """A stage-2 or stage-3 row. `pos_index` lists the gold documents' indices (may be empty:
    unknown)."""

    question: str
    docs: tuple[str, ...]
    answer: str  # the training target
    answers: tuple[str, ...]  # every acceptable answer given in the row (answer first)
    pos_index: tuple[int, ...]


@dataclass(frozen=True)
class CorpusRow:
    id: str
    title: str
    text: str


@dataclass
class ReadStats:
    """Counts of one read; `errors` keeps the first few messages."""

    rows: int = 0
    bad_rows: int = 0
    errors: list[str] = field(default_factory=list)

    def add_error(self, err: DataError, keep: int = 20) -> None:
        self.bad_rows += 1
        if len(self.errors) < keep:
            self.errors.append(str(err))


def _str(row: dict, name: str, path, line: int, allow_empty: bool = False) -> str:
    if name not in row:
        raise DataError(path, line, name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(path, line, name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, line, name, "is empty")
    return value


def _str_list(row: dict, name: str, path, line: int, allow_empty_items: bool = False
              ) -> tuple[str, ...]:
    if name not in row:
        raise DataError(path, line, name, "missing")
    value = row[name]
    if not isinstance(value, list):
        raise DataError(path, line, name, f"must be a list of strings, got "
                        f"{type(value).__name__}")
    if not value:
        raise DataError(path, line, name, "is an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(path, line, f"{name}[{i}]",
                            f"must be a string, got {type(item).__name__}")
        if not allow_empty_items and not item.strip():
            raise DataError(path, line, f"{name}[{i}]", "is empty")
    return tuple(value)


def _docs(row: dict, path, line: int) -> tuple[str, ...]:
    for name in ("docs", "context", "content"):
        if name in row:
            return _str_list(row, name, path, line)
    raise DataError(path, line, "docs", "missing (also looked for 'context' and 'content')")


def _answers(row: dict, path, line: int) -> tuple[str, tuple[str, ...]]:
    """The training answer and all given answers, in the reference reader's priority order."""
    found: list[str] = []
    if "answer" in row:
        found.append(_str(row, "answer", path, line))
    for name in ("answers", "golden_answers"):
        if name in row:
            found.extend(_str_list(row, name, path, line))
    if "gold_answer" in row:
        found.append(_str(row, "gold_answer", path, line))
    if not found:
        raise DataError(path, line, "answer",
                        "missing (looked for 'answer', 'answers', 'golden_answers', "
                        "'gold_answer')")
    return found[0], tuple(dict.fromkeys(found))


def _pos_index(row: dict, n_docs: int, path, line: int, required: bool) -> tuple[int, ...]:
    if "pos_index" not in row:
        if required:
            raise DataError(path, line, "pos_index", "missing")
        return ()
    value = row["pos_index"]
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        # bool is an int subclass; `true` is never a document index.
        if not isinstance(item, int) or isinstance(item, bool):
            raise DataError(path, line, "pos_index",
                            f"must be an integer or a list of integers, got {value!r}")
        if not 0 <= item < n_docs:
            raise DataError(path, line, "pos_index",
                            f"{item} out of range for {n_docs} documents")
        out.append(item)
    return tuple(dict.fromkeys(out))


def parse_stage1(row: dict, path, line: int) -> Stage1Row:
    data_type = row.get("data_type", "qa")
    if data_type not in ("qa", "paraphrase"):
        raise DataError(path, line, "data_type",
                        f"must be 'qa' or 'paraphrase', got {data_type!r}")
    docs = _docs(row, path, line)
    answers = _str_list(row, "answers", path, line)
    if data_type == "paraphrase":
        return Stage1Row("paraphrase", (), answers[:1], docs)
    questions = _str_list(row, "question", path, line)
    if len(questions) != len(answers):
        raise DataError(path, line, "answers", f"{len(answers)} answers for "
                        f"{len(questions)} questions (must match)")
    return Stage1Row("qa", questions, answers, docs)


def parse_stage2(row: dict, path, line: int) -> QARow:
    question = _str(row, "question", path, line)
    docs = _docs(row, path, line)
    answer, answers = _answers(row, path, line)
    return QARow(question, docs, answer, answers, _pos_index(row, len(docs), path, line, False))


def parse_stage3(row: dict, path, line: int) -> QARow:
    question = _str(row, "question", path, line)
    docs = _docs(row, path, line)
    answer, answers = _answers(row, path, line)
    return QARow(question, docs, answer, answers, _pos_index(row, len(docs), path, line, False))


def parse_corpus(row: dict, path, line: int) -> CorpusRow:
    if "id" not in row:
        raise DataError(path, line, "id", "missing")
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise DataError(path, line, "id", f"must be a non-empty string or an integer, got "
                        f"{rid!r}")
    title = _str(row, "title", path, line, allow_empty=True) if "title" in row else ""
    return CorpusRow(str(rid), title, _str(row, "text", path, line))


PARSERS = {"stage1": parse_stage1, "stage2": parse_stage2, "stage3": parse_stage3,
           "corpus": parse_corpus}


def _check_surrogates(obj, path, line: int, where: str = "") -> None:
    """DataError naming the field of a string holding a lone surrogate (an escape such as
    \\ud800 that JSON accepts and no UTF-8 file or tokenizer can hold)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(path, line, where or None, f"lone surrogate "
                            f"{obj[e.start]!r} at character {e.start}: not valid Unicode"
                            ) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_surrogates(v, path, line, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_surrogates(v, path, line, f"{where}[{i}]")


def iter_jsonl(path: str | os.PathLike, fmt: str, skip_bad_rows: bool = False,
               stats: ReadStats | None = None) -> Iterator[tuple[int, object]]:
    """Yields (line number, parsed row) for each non-blank line of `path` in format `fmt`.

    Raises DataError on the first bad row unless `skip_bad_rows`, in which case bad rows are
    counted in `stats` and skipped.
    """
    if fmt not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    parse = PARSERS[fmt]
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, None, "no such file")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, line_no, None,
                                    f"invalid UTF-8 at byte {e.start}") from None
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(path, line_no, None,
                                    f"malformed JSON at column {e.colno}: {e.msg}") from None
                except RecursionError:
                    raise DataError(path, line_no, None, "JSON nested too deeply to read "
                                    "(thousands of levels)") from None
                if "\\ud" in text.lower():  # JSON escapes may spell half a surrogate pair
                    _check_surrogates(obj, path, line_no)
                if not isinstance(obj, dict):
                    raise DataError(path, line_no, None,
                                    f"must be a JSON object, got {type(obj).__name__}")
                row = parse(obj, path, line_no)
            except DataError as err:
                if not skip_bad_rows:
                    raise
                stats.add_error(err)
                continue
            stats.rows += 1
            yield line_no, row


def check_unique_ids(rows, path) -> None:
    """DataError naming both lines when two corpus rows share an id (an index, and the
    chunk ids `ID#k`, need each id once)."""
    first: dict[str, int] = {}
    for line, row in rows:
        if row.id in first:
            raise DataError(path, line, "id", f"duplicate id {row.id!r} (first on line "
                            f"{first[row.id]}); every corpus id must be unique")
        first[row.id] = line


def read_jsonl(path, fmt: str, skip_bad_rows: bool = False
               ) -> tuple[list[tuple[int, object]], ReadStats]:
    """All rows of a file as a list of (line number, row), and the read's counts."""
    stats = ReadStats()
    rows = list(iter_jsonl(path, fmt, skip_bad_rows, stats))
    return rows, stats


def row_to_json(row) -> dict:
    """The reference-format JSON object of a parsed row (inverse of the parsers)."""
    if isinstance(row, Stage1Row):
        if row.data_type == "paraphrase":
            return {"data_type": "paraphrase", "question": "", "answers": list(row.answers),
                    "docs": list(row.docs)}
        return {"data_type": "qa", "question": list(row.questions),
                "answers": list(row.answers), "docs": list(row.docs)}
    if isinstance(row, QARow):
        out = {"question": row.question, "docs": list(row.docs), "answer": row.answer}
        if len(row.answers) > 1:
            out["answers"] = list(row.answers)
        if row.pos_index:
            out["pos_index"] = list(row.pos_index)
        return out
    if isinstance(row, CorpusRow):
        return {"id": row.id, "title": row.title, "text": row.text}
    raise TypeError(f"not a row: {type(row).__name__}")


def doc_texts(row) -> list[str]:
    """The document texts of any row. A corpus row's title stays a separate field (not part of
    the text), so that a corpus document and the same document inside a stage-3 row compress
    to the same latents."""
    if isinstance(row, CorpusRow):
        return [row.text]
    return list(row.docs)


def chunk_windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most `size` covering range(n), consecutive windows sharing
    `overlap` items. One window when n <= size. (Here, free of TensorFlow Datasets, so that
    the index can split documents exactly as the corpus datasets do.)"""
    if size <= overlap:
        raise ValueError(f"chunk size {size} must exceed the overlap {overlap}")
    if n <= size:
        return [(0, n)]
    stride = size - overlap
    starts = list(range(0, n - overlap, stride))
    return [(s, min(s + size, n)) for s in starts if s < n and (s == 0 or s + overlap < n)]


def document_chunks(text: str, ids, tok, size: int, overlap: int
                    ) -> list[tuple[tuple[int, int], str]]:
    """(window, text) of each chunk of a document whose token ids are `ids` (`tok` decodes
    them): the windows of `chunk_windows(len(ids), size, overlap)`; a document that fits is one
    chunk holding `text` itself, a longer one's chunk k is `tok.decode(ids[a:b])`. The corpus
    datasets, the index and chunked stage documents (data.stage_doc_chunks) all split with
    this, so that their chunks are the same texts."""
    windows = chunk_windows(len(ids), size, overlap)
    if len(windows) == 1:
        return [(windows[0], text)]
    return [((a, b), tok.decode(ids[a:b])) for a, b in windows]
