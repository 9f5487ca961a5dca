"""Readers for the reference JSONL formats: round trips, bad input and the shared real data."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clara_jax.data import formats
from clara_jax.data.formats import CorpusRow, DataError, QARow, Stage1Row, chunk_windows

from .conftest import SHARED

REAL = SHARED / "data" / "ml-clara-example" / "pretrain_data.800.jsonl"
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Non-blank text, any unicode except surrogates (not encodable as UTF-8).
text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip())
texts = st.lists(text, min_size=1, max_size=5)


@st.composite
def stage1_rows(draw):
    if draw(st.booleans()):
        return Stage1Row("paraphrase", (), (draw(text),), tuple(draw(texts)))
    qs = draw(texts)
    answers = draw(st.lists(text, min_size=len(qs), max_size=len(qs)))
    return Stage1Row("qa", tuple(qs), tuple(answers), tuple(draw(texts)))


@st.composite
def qa_rows(draw):
    docs = tuple(draw(st.lists(text, min_size=1, max_size=8)))
    answers = tuple(dict.fromkeys(draw(texts)))
    pos = tuple(sorted(draw(st.sets(st.integers(0, len(docs) - 1), max_size=len(docs)))))
    return QARow(draw(text), docs, answers[0], answers, pos)


corpus_rows = st.builds(CorpusRow, id=text, title=st.one_of(st.just(""), text), text=text)
ROWS = {"stage1": stage1_rows(), "stage2": qa_rows(), "stage3": qa_rows(),
        "corpus": corpus_rows}


def _write(path, objs):
    with open(path, "w", encoding="utf-8") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n")
    return path


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_round_trip(fmt, tmp_path):
    @FAST
    @given(st.lists(ROWS[fmt], min_size=1, max_size=6))
    def check(rows):
        path = _write(tmp_path / f"{fmt}.jsonl", [formats.row_to_json(r) for r in rows])
        got, stats = formats.read_jsonl(path, fmt)
        assert [r for _, r in got] == rows
        assert stats.rows == len(rows) and stats.bad_rows == 0

    check()


# (format, mutation of a valid JSON object, field named in the error)
MUTATIONS = [
    ("stage1", lambda o: o.pop("docs"), "docs"),
    ("stage1", lambda o: o.update(docs="just a string"), "docs"),
    ("stage1", lambda o: o.update(docs=[""]), "docs[0]"),
    ("stage1", lambda o: o.update(docs=["ok", 3]), "docs[1]"),
    ("stage1", lambda o: o.update(answers=o["answers"] + ["extra"]), "answers"),
    ("stage1", lambda o: o.update(data_type="summary"), "data_type"),
    ("stage1", lambda o: o.update(question=[]), "question"),
    ("stage2", lambda o: o.pop("question"), "question"),
    ("stage2", lambda o: o.update(question=["a list"]), "question"),
    ("stage2", lambda o: [o.pop(k) for k in ("answer", "gold_answer")], "answer"),
    ("stage3", lambda o: o.update(pos_index=len(o["docs"])), "pos_index"),
    ("stage3", lambda o: o.update(pos_index=[-1]), "pos_index"),
    ("stage3", lambda o: o.update(pos_index="0"), "pos_index"),
    ("stage3", lambda o: o.update(answers=[1]), "answers[0]"),
    ("corpus", lambda o: o.update(text="   "), "text"),
    ("corpus", lambda o: o.pop("id"), "id"),
    ("corpus", lambda o: o.update(title=5), "title"),
]
VALID = {
    "stage1": {"data_type": "qa", "question": ["q1", "q2"], "answers": ["a1", "a2"],
               "docs": ["a document"]},
    "stage2": {"question": "q", "docs": ["d1", "d2"], "gold_answer": "a", "answer": "a"},
    "stage3": {"question": "q", "docs": ["d1", "d2", "d3"], "pos_index": [1], "answer": "a"},
    "corpus": {"id": 7, "title": "t", "text": "some text"},
}


@pytest.mark.parametrize("fmt,mutate,field", MUTATIONS)
def test_bad_field_is_named_and_skippable(fmt, mutate, field, tmp_path):
    bad = json.loads(json.dumps(VALID[fmt]))
    mutate(bad)
    path = _write(tmp_path / "x.jsonl", [VALID[fmt], VALID[fmt], bad, VALID[fmt]])
    with pytest.raises(DataError) as err:
        formats.read_jsonl(path, fmt)
    assert err.value.line == 3 and err.value.field == field
    assert str(err.value).startswith(f"{path}:3: field {field!r}:")
    rows, stats = formats.read_jsonl(path, fmt, skip_bad_rows=True)
    assert [line for line, _ in rows] == [1, 2, 4]
    assert (stats.rows, stats.bad_rows) == (3, 1)


def test_malformed_json_invalid_utf8_and_non_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    good = json.dumps(VALID["corpus"]).encode()
    path.write_bytes(b"\n".join([good, b'{"id": 1, "text": "unterminated', good,
                                 b'{"id": 2, "text": "caf\xe9"}', b"[1, 2]", b"", good]))
    with pytest.raises(DataError, match=r"x.jsonl:2: malformed JSON"):
        formats.read_jsonl(path, "corpus")
    rows, stats = formats.read_jsonl(path, "corpus", skip_bad_rows=True)
    assert [line for line, _ in rows] == [1, 3, 7]  # line 6 is blank: not a row
    assert stats.bad_rows == 3
    assert "x.jsonl:4: invalid UTF-8 at byte" in stats.errors[1]
    assert "x.jsonl:5: must be a JSON object" in stats.errors[2]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        formats.read_jsonl(tmp_path / "nope.jsonl", "stage1")


def test_reference_answer_priority_and_aliases(tmp_path):
    rows = [{"question": "q", "context": ["c"], "golden_answers": ["g1", "g2"]},
            {"question": "q", "content": ["c"], "answers": ["x"], "answer": "first"},
            {"question": "q", "docs": ["c", "d"], "gold_answer": "gold", "pos_index": 1}]
    got = [r for _, r in formats.read_jsonl(_write(tmp_path / "s.jsonl", rows), "stage3")[0]]
    assert (got[0].answer, got[0].answers, got[0].docs) == ("g1", ("g1", "g2"), ("c",))
    assert (got[1].answer, got[1].answers) == ("first", ("first", "x"))
    assert (got[2].answer, got[2].pos_index) == ("gold", (1,))


def test_shared_real_data_loads_as_is():
    rows, stats = formats.read_jsonl(REAL, "stage1")
    assert stats.rows == 800 and stats.bad_rows == 0
    first = rows[0][1]
    assert first.data_type == "qa" and len(first.docs) == 1
    assert first.questions[0].startswith("Who is the editor-in-chief of Thrasher magazine")
    assert sum(len(r.questions) for _, r in rows) > 5000


@FAST
@given(st.integers(0, 400), st.integers(2, 64), st.data())
def test_chunk_windows_cover_with_overlap(n, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    windows = chunk_windows(n, size, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == n
    assert all(0 < b - a <= size or n == 0 for a, b in windows)
    for (a0, b0), (a1, _) in zip(windows, windows[1:]):
        assert a1 > a0 and b0 - a1 == overlap  # consecutive windows share `overlap` items
    if n <= size:
        assert windows == [(0, n)]
