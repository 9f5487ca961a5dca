"""One stored example (a dict as the TFDS sources give it) -> the fixed-shape arrays of the
batch contract (`clara_jax.data.pipeline`). Kept apart from the grain pipeline so that code
without grain or TFDS (the pretraining stream of `projects.demo.pretrain`) featurizes the same
way.

A stage-2/3 example marked `text_prompt` (the pipeline marks a share data.text_share of the
training examples, `pipeline.TextChoice`) gets a text row: its K documents' text in the prompt
in place of their slots (`prompts.text_generator_example`), the same documents (candidates) and
query as a latent row. An example without the key is a latent row."""

from __future__ import annotations

import dataclasses

import numpy as np

from clara_jax.data import prompts
from clara_jax.data.tokenizer import Tokenizer

# The stored-example key that asks for a text row (stages 2-3), set by `pipeline.TextChoice`.
TEXT_PROMPT_KEY = "text_prompt"


def as_text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def as_texts(xs) -> list[str]:
    return [as_text(x) for x in xs]


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
            doc_tokens, doc_mask = self._docs([as_text(ex["doc"])])
            question = as_text(ex["question"])
            qa = as_text(ex["data_type"]) == "qa"
            out = {"doc_tokens": doc_tokens, "doc_mask": doc_mask,
                   **self._query(question, 0 if qa else -1)}
            out.update(self._generator(question, as_text(ex["answer"]), 1,
                                       self.answer_max_len if qa else self.paraphrase_max_len))
            return out
        docs = as_texts(ex["docs"])
        pos = [int(p) for p in np.asarray(ex["pos_index"]).reshape(-1)]
        question, answer = as_text(ex["question"]), as_text(ex["answer"])
        want = self.num_docs if self.stage == 2 else self.num_candidates
        try:
            keep, first = select_docs(len(docs), pos, want)
        except ValueError as e:
            raise ValueError(f"stage-{self.stage} example from line {int(ex['line'])}: {e}") \
                from None
        tokens, mask = self._docs([docs[i] for i in keep])
        if bool(ex.get(TEXT_PROMPT_KEY, False)):
            # The K documents a latent row would read: stage 2's kept ones, in stage 3 the gold
            # ones and then the first others among the candidates (retrieval's place at
            # inference; the row trains the generator only).
            text_keep = keep if self.stage == 2 else select_docs(len(docs), pos,
                                                                 self.num_docs)[0]
            out = prompts.text_generator_example(
                self.tok, question, answer, [docs[i] for i in text_keep],
                prompts.text_doc_room(self.doc_len), self.gen_len, self.question_max_len,
                self.answer_max_len).arrays()
        else:
            out = self._generator(question, answer, self.num_docs, self.answer_max_len)
        if self.stage == 2:
            return {"doc_tokens": tokens, "doc_mask": mask, **self._query(question, first), **out}
        return {"cand_tokens": tokens, "cand_mask": mask, **self._query(question, first), **out}

    def _query(self, question: str, pos_index: int) -> dict[str, np.ndarray]:
        q_tokens, q_mask, _ = prompts.encode_document(self.tok, question, self.query_len)
        return {"query_tokens": q_tokens, "query_mask": q_mask, "pos_index": np.int32(pos_index)}
