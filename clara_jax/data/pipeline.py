"""grain pipelines: built TFDS datasets -> fixed-shape numpy training batches.

`make_loader(config, stage, data_dir)` reads OUT/clara_stage{1,2,3} and OUT/tokenizer as
written by `clara data build`, and yields batches that follow the shared contract (B is the
per-process batch, config.train.batch_size / process_count; Td = data.doc_max_len;
T = prompts.generator_length(config, stage); Tq = data.question_max_len; K = data.num_docs;
C = data.num_candidates; M = model.num_memory_tokens):

  every stage: query_tokens int32[B,Tq], query_mask bool[B,Tq] (the question framed as a
           document, for the query reasoner), pos_index int32[B] (below)
  stage 1: doc_tokens int32[B,1,Td], doc_mask bool[B,1,Td], tokens int32[B,T], mask bool[B,T],
           slot_mask bool[B,T] (M slots), targets int32[B,T], loss_mask bool[B,T];
           pos_index 0 for a QA pair, -1 for a paraphrase (no question)
  stage 2: doc_tokens int32[B,K,Td], doc_mask bool[B,K,Td] and the generator fields (K*M slots)
  stage 3: cand_tokens int32[B,C,Td], cand_mask bool[B,C,Td] and the generator fields
  stages 2-3: pos_index is the row's first listed gold document among the K (C) kept, -1 if
           unknown; the bundled world lists the subject's document first

Order of operations: seeded shuffle, reshuffled every epoch -> repeat -> (training split,
`data.swap_answers` > 0: counterfactual answers, `AnswerSwap`) -> per-process shard (strided
by process index) -> tokenise and pad -> batch (dropping the last partial batch). The
iterator is a grain `DatasetIterator`: `get_state()` / `set_state(state)` restore the exact
position (save the state with the checkpoint).

Rows of stages 2/3 with more documents than K (C) keep their gold documents (`pos_index`) and
then the first others, in their original order.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import grain
import numpy as np

from clara_jax.data import prompts, tfds_build
from clara_jax.data.formats import CorpusRow, QARow
from clara_jax.data.tokenizer import Tokenizer, check_tokenizer_fits, load_tokenizer


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _texts(xs) -> list[str]:
    return [_text(x) for x in xs]


def select_docs(n_docs: int, pos_index: list[int], want: int) -> tuple[list[int], int]:
    """Indices of `want` documents out of n_docs: gold ones first in priority, then the first
    others; returned in their original order. Also returns the new position of the row's
    first listed gold document, pos_index[0] (-1 when there is none)."""
    if n_docs < want:
        raise ValueError(f"{n_docs} documents, {want} needed")
    gold = [p for p in pos_index if 0 <= p < n_docs][:want]
    rest = [i for i in range(n_docs) if i not in gold][: want - len(gold)]
    keep = sorted(gold + rest)
    return keep, (keep.index(gold[0]) if gold else -1)


@dataclasses.dataclass
class Featurizer:
    """Turns one stored example (a dict from the TFDS source) into fixed-shape arrays."""

    tok: Tokenizer
    stage: int
    doc_len: int  # Td
    query_len: int  # Tq
    num_docs: int  # K
    num_candidates: int  # C
    num_memory: int  # M
    gen_len: int  # T
    question_max_len: int
    answer_max_len: int
    paraphrase_max_len: int

    @classmethod
    def from_config(cls, tok: Tokenizer, config, stage: int) -> Featurizer:
        d = config.data
        return cls(tok, stage, int(d.doc_max_len), int(d.question_max_len), int(d.num_docs),
                   int(d.num_candidates), int(config.model.num_memory_tokens),
                   prompts.generator_length(config, stage), int(d.question_max_len),
                   int(d.answer_max_len), int(d.paraphrase_max_len))

    def _docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (int32[n, Td], bool[n, Td])."""
        toks, masks = zip(*[prompts.encode_document(self.tok, t, self.doc_len)[:2]
                            for t in texts])
        return np.stack(toks), np.stack(masks)

    def _generator(self, question: str, answer: str, k: int, answer_max_len: int
                   ) -> dict[str, np.ndarray]:
        return prompts.generator_example(
            self.tok, question, answer, k, self.num_memory, self.gen_len,
            self.question_max_len, answer_max_len).arrays()

    def __call__(self, ex: dict) -> dict[str, np.ndarray]:
        if self.stage == 1:
            doc_tokens, doc_mask = self._docs([_text(ex["doc"])])
            question = _text(ex["question"])
            qa = _text(ex["data_type"]) == "qa"
            out = {"doc_tokens": doc_tokens, "doc_mask": doc_mask,
                   **self._query(question, 0 if qa else -1)}
            out.update(self._generator(question, _text(ex["answer"]), 1,
                                       self.answer_max_len if qa else self.paraphrase_max_len))
            return out
        docs = _texts(ex["docs"])
        pos = [int(p) for p in np.asarray(ex["pos_index"]).reshape(-1)]
        question, answer = _text(ex["question"]), _text(ex["answer"])
        want = self.num_docs if self.stage == 2 else self.num_candidates
        try:
            keep, first = select_docs(len(docs), pos, want)
        except ValueError as e:
            raise ValueError(f"stage-{self.stage} example from line {int(ex['line'])}: {e}") \
                from None
        tokens, mask = self._docs([docs[i] for i in keep])
        out = self._generator(question, answer, self.num_docs, self.answer_max_len)
        if self.stage == 2:
            return {"doc_tokens": tokens, "doc_mask": mask, **self._query(question, first), **out}
        return {"cand_tokens": tokens, "cand_mask": mask, **self._query(question, first), **out}

    def _query(self, question: str, pos_index: int) -> dict[str, np.ndarray]:
        q_tokens, q_mask, _ = prompts.encode_document(self.tok, question, self.query_len)
        return {"query_tokens": q_tokens, "query_mask": q_mask, "pos_index": np.int32(pos_index)}


_CAPITALISED_OR_NUMBER = re.compile(r"\b(?:[A-Z][\w'-]*|\d[\d,.]*)")


def question_kind(question: str) -> str:
    """What a question asks, without whom it asks about: its words, lower-cased, with
    capitalised words (after the first) and numbers removed. "What is the capital of Mochakora?"
    and "What is the capital of Trastolora?" are one kind."""
    first, _, rest = question.strip().partition(" ")
    rest = _CAPITALISED_OR_NUMBER.sub("", rest)
    return " ".join(f"{first} {rest}".lower().split())


def _mentions(answer: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(answer) + r"(?!\w)")


@dataclasses.dataclass
class AnswerSwap:
    """Counterfactual answers: with probability `rate`, an example's answer is replaced, in
    every one of its documents and in its target, by the answer of a random example of the
    same kind of question (`question_kind`) from the same split. A generator trained on a
    fixed world otherwise learns its facts by heart and answers without reading its
    documents; after a swap the documents are the only source of the answer, while the
    answers' distribution per kind of question stays that of the data (drawn with their
    frequencies). Examples whose answer is not in their documents, paraphrases, and kinds
    with a single distinct answer are left as they are.

    pools: kind -> the answers of all its examples, sorted (repeats kept).
    """

    rate: float
    pools: dict[str, list[str]]

    @classmethod
    def from_source(cls, source, rate: float) -> AnswerSwap:
        """Pools from every example of a TFDS source (one pass over its questions)."""
        pools: dict[str, list[str]] = {}
        for i in range(len(source)):
            ex = source[i]
            if _text(ex.get("data_type", "qa")) != "qa":
                continue
            pools.setdefault(question_kind(_text(ex["question"])), []).append(
                _text(ex["answer"]))
        return cls(rate, {k: sorted(v) for k, v in pools.items() if len(set(v)) > 1})

    def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
        if _text(ex.get("data_type", "qa")) != "qa" or rng.random() >= self.rate:
            return ex
        pool = self.pools.get(question_kind(_text(ex["question"])))
        answer = _text(ex["answer"])
        key = "doc" if "doc" in ex else "docs"
        docs = [_text(ex["doc"])] if key == "doc" else _texts(ex["docs"])
        found = _mentions(answer)
        if not pool or not any(found.search(d) for d in docs):
            return ex
        # A substitute that the documents do not already mention, so the answer stays unique.
        for _ in range(8):
            new = pool[int(rng.integers(len(pool)))]
            if new != answer and not any(_mentions(new).search(d) for d in docs):
                break
        else:
            return ex
        docs = [found.sub(lambda _: new, d) for d in docs]
        out = dict(ex, answer=new)
        out[key] = docs[0] if key == "doc" else docs
        return out


class _Swap(grain.transforms.RandomMap):
    def __init__(self, swap: AnswerSwap):
        self.swap = swap

    def random_map(self, element, rng: np.random.Generator):
        return self.swap(element, rng)


class _Featurize(grain.transforms.Map):
    def __init__(self, featurizer: Featurizer):
        self.featurizer = featurizer

    def map(self, element):
        return self.featurizer(element)


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def make_dataset(config, stage: int, data_dir, split: str = "train", seed: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None, tokenizer: Tokenizer | None = None
                 ) -> grain.MapDataset:
    """The batched grain MapDataset behind `make_loader` (random access by batch index)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    process_index, process_count = _process(process_index, process_count)
    batch = int(config.train.batch_size)
    if batch % process_count:
        raise ValueError(f"config.train.batch_size={batch} is not divisible by the "
                         f"{process_count} processes")
    tok = tokenizer or load_tokenizer(Path(data_dir) / tfds_build.TOKENIZER_DIR)
    check_tokenizer_fits(tok, config)
    source = tfds_build.data_source(f"stage{stage}", data_dir, split)
    ds = grain.MapDataset.source(source)
    if len(ds) < batch:
        raise ValueError(f"{data_dir} split {split!r}: {len(ds)} examples, fewer than one "
                         f"batch of {batch}")
    # Every process shuffles the same way and then takes every process_count-th example, so
    # global batch k is always examples [k*B, (k+1)*B) of one stream, whatever the number of
    # processes: a 2-process run sees exactly the batches of a 1-process run.
    ds = ds.shuffle(seed=int(config.train.seed if seed is None else seed))
    ds = ds.repeat(num_epochs)
    rate = float(config.data.swap_answers)
    if split == "train" and rate > 0:  # before sharding: each swap follows the global index
        ds = ds.random_map(_Swap(AnswerSwap.from_source(source, rate)),
                           seed=int(config.train.seed if seed is None else seed))
    ds = ds[process_index::process_count]
    ds = ds.map(_Featurize(Featurizer.from_config(tok, config, stage)))
    return ds.batch(batch // process_count, drop_remainder=True)


def make_loader(config, stage: int, data_dir, split: str = "train", seed: int | None = None,
                process_index: int | None = None, process_count: int | None = None,
                num_epochs: int | None = None, read_threads: int = 2, prefetch: int = 8,
                tokenizer: Tokenizer | None = None) -> grain.DatasetIterator:
    """An iterator of training batches (numpy dicts, see the module docstring) with
    `get_state()` / `set_state()` for exact resume. num_epochs=None repeats forever."""
    ds = make_dataset(config, stage, data_dir, split, seed, process_index, process_count,
                      num_epochs, tokenizer)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def load_data_tokenizer(data_dir) -> Tokenizer:
    """The tokenizer a built data dir was made with (DATA_DIR/tokenizer)."""
    return load_tokenizer(Path(data_dir) / tfds_build.TOKENIZER_DIR)


@dataclasses.dataclass(frozen=True)
class Stage1Example:
    data_type: str
    question: str
    answer: str
    doc: str
    line: int


def read_rows(fmt: str, data_dir, split: str = "train", limit: int | None = None) -> list:
    """Rows of a built dataset in file order, for evaluation and inference:
    stage1 -> Stage1Example, stage2/stage3 -> formats.QARow, corpus -> formats.CorpusRow (a
    chunked document's chunks get ids "ID#k")."""
    source = tfds_build.data_source(fmt, data_dir, split)
    n = len(source) if limit is None else min(limit, len(source))
    rows = []
    for i in range(n):
        ex = source[i]
        if fmt == "stage1":
            rows.append(Stage1Example(_text(ex["data_type"]), _text(ex["question"]),
                                      _text(ex["answer"]), _text(ex["doc"]), int(ex["line"])))
        elif fmt in ("stage2", "stage3"):
            pos = tuple(int(p) for p in np.asarray(ex["pos_index"]).reshape(-1))
            rows.append(QARow(_text(ex["question"]), tuple(_texts(ex["docs"])),
                              _text(ex["answer"]), tuple(_texts(ex["answers"])), pos))
        else:
            rid = _text(ex["id"])
            if int(ex["num_chunks"]) > 1:
                rid = f"{rid}#{int(ex['chunk'])}"
            rows.append(CorpusRow(rid, _text(ex["title"]), _text(ex["text"])))
    return rows
