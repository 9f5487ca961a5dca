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
with an `augment`: its seeded per-example transform, e.g. the demo's counterfactual answers,
projects/demo/answer_swap.py) -> (training split, stages 2-3, `data.text_share` > 0: text rows
chosen, `TextChoice`) -> per-process shard (strided by
process index) -> tokenise and pad -> batch (dropping the last partial batch). The
iterator is a grain `DatasetIterator`: `get_state()` / `set_state(state)` restore the exact
position (save the state with the checkpoint).

Text rows (a share data.text_share of the stage-2/3 training rows, each chosen by a draw of
the seeded pipeline, so a seed fixes them and resume stays exact) have the K documents' text in
their prompt instead of latent slots, as the text-RAG baseline reads them at inference
(`prompts.text_generator_example`): slot_mask all False, every other field as in a latent
row, and T makes room for the text (`prompts.generator_length`).

Rows of stages 2/3 with more documents than K (C) keep their gold documents (`pos_index`) and
then the first others, in their original order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import numpy as np

from clara_jax.data import prompts, tfds_build
from clara_jax.data.featurize import TEXT_PROMPT_KEY, Featurizer, as_text, as_texts
from clara_jax.data.formats import CorpusRow, QARow
from clara_jax.data.tokenizer import Tokenizer, check_tokenizer_fits, load_tokenizer

# A training-split example transform, built from the split's TFDS source: see make_loader.
Augment = Callable[[object], Callable[[dict, np.random.Generator], dict]]

class _RandomMap(grain.transforms.RandomMap):
    """A seeded per-example transform `fn(example, rng) -> example` (an `augment`'s,
    TextChoice) as a grain RandomMap."""

    def __init__(self, fn):
        self.fn = fn

    def random_map(self, element, rng: np.random.Generator):
        return self.fn(element, rng)


@dataclasses.dataclass
class TextChoice:
    """Marks an example for a text row (`featurize.TEXT_PROMPT_KEY`) with probability
    `share`: the generator then reads its documents' text instead of their latents."""

    share: float

    def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
        return dict(ex, **{TEXT_PROMPT_KEY: bool(rng.random() < self.share)})


def text_choice_seed(seed: int) -> int:
    """The seed of the text-row draws: derived from the run's seed, but not equal to it, so
    that they are independent of an `augment`'s draws (grain keys each element's generator by
    the seed and the element's index)."""
    return int(np.random.SeedSequence([int(seed), 0x7465_7874]).generate_state(1)[0])


class _Featurize(grain.transforms.Map):
    def __init__(self, featurizer: Featurizer):
        self.featurizer = featurizer

    def map(self, element):
        return self.featurizer(element)


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def make_dataset(config, stage: int, data_dir, split: str = "train", seed: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None, tokenizer: Tokenizer | None = None,
                 augment: Augment | None = None) -> grain.MapDataset:
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
    seed = int(config.train.seed if seed is None else seed)
    ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if split == "train" and augment is not None:  # before sharding: follows the global index
        ds = ds.random_map(_RandomMap(augment(source)), seed=seed)
    if split == "train" and prompts.has_text_rows(config, stage):  # before sharding, too
        ds = ds.random_map(_RandomMap(TextChoice(float(config.data.text_share))),
                           seed=text_choice_seed(seed))
    ds = ds[process_index::process_count]
    ds = ds.map(_Featurize(Featurizer.from_config(tok, config, stage)))
    return ds.batch(batch // process_count, drop_remainder=True)


def make_loader(config, stage: int, data_dir, split: str = "train", seed: int | None = None,
                process_index: int | None = None, process_count: int | None = None,
                num_epochs: int | None = None, read_threads: int = 2, prefetch: int = 8,
                tokenizer: Tokenizer | None = None,
                augment: Augment | None = None) -> grain.DatasetIterator:
    """An iterator of training batches (numpy dicts, see the module docstring) with
    `get_state()` / `set_state()` for exact resume. num_epochs=None repeats forever.
    `augment(source) -> fn(example, rng) -> example`: a seeded transform of the training
    split's stored examples (given the TFDS source, e.g. to pool its answers), applied before
    featurizing."""
    ds = make_dataset(config, stage, data_dir, split, seed, process_index, process_count,
                      num_epochs, tokenizer, augment)
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
            rows.append(Stage1Example(as_text(ex["data_type"]), as_text(ex["question"]),
                                      as_text(ex["answer"]), as_text(ex["doc"]), int(ex["line"])))
        elif fmt in ("stage2", "stage3"):
            pos = tuple(int(p) for p in np.asarray(ex["pos_index"]).reshape(-1))
            rows.append(QARow(as_text(ex["question"]), tuple(as_texts(ex["docs"])),
                              as_text(ex["answer"]), tuple(as_texts(ex["answers"])), pos))
        else:
            rid = as_text(ex["id"])
            if int(ex["num_chunks"]) > 1:
                rid = f"{rid}#{int(ex['chunk'])}"
            rows.append(CorpusRow(rid, as_text(ex["title"]), as_text(ex["text"])))
    return rows
