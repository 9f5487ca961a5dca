"""Prompt formats shared by training and inference (one place, so they cannot drift apart).

Compressor input (a document, or a question for the query reasoner), right-padded to Td:
    <ENC> BOS doc EOS
The model appends the M memory embeddings itself, so no `<MEM>` ids appear here.

Generator sequence (prompt, then answer):
    BOS "Background:\\n" K x ([M slot positions] <SEP>) "\\n\\nQuestion: " q "\\nAnswer:" " " a EOS
Slot positions hold the pad id in `tokens` (the model replaces their embeddings with the
documents' latents); `slot_mask` marks them. Stage-1 paraphrase rows use PARAPHRASE_QUESTION as
the question. `tokens[t]` is followed by `targets[t]` (targets are the sequence shifted left by
one); `loss_mask` marks targets that belong to the answer (its tokens and the EOS).

Text rows (`text_generator_example`; a share data.text_share of the stage-2/3 training rows)
carry the K documents' text in place of their slots, framed exactly as `text_rag_prompt` frames
it for the text-RAG baseline at inference, with the same answer and loss mask and no slots:
    BOS "Background:\\n" K x (text "\\n") "\\n\\nQuestion: " q "\\nAnswer:" " " a EOS

Lengths are fixed per config (`generator_length`): FRAME_BUDGET tokens for the fixed text and
BOS, K*(M+1) for the slots and separators, data.question_max_len for the question,
data.answer_max_len for the answer including its EOS; in stage 1, room for the longer of that
answer and a paraphrase of data.paraphrase_max_len tokens (`answer_room`). When
data.text_share > 0, stages 2-3 make room for K documents' text instead of their slots where
that is longer: K*(text_doc_room + TEXT_SEP_BUDGET).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from clara_jax.config import DOC_FRAME
from clara_jax.data.tokenizer import Tokenizer

BACKGROUND = "Background:\n"
QUESTION_PREFIX = "\n\nQuestion: "
ANSWER_PREFIX = "\nAnswer:"
ANSWER_SEPARATOR = " "
TEXT_DOC_SEPARATOR = "\n"
PARAPHRASE_QUESTION = "Paraphrase the background."
# Tokens reserved for BOS, BACKGROUND, QUESTION_PREFIX and ANSWER_PREFIX. A tokenizer that
# needs more (checked in `_frame`) gets a clear error rather than silently longer sequences.
FRAME_BUDGET = 24
# DOC_FRAME, the framing tokens of a compressor input (<ENC>, BOS, EOS), is defined in
# clara_jax.config, whose validation of data.chunk_overlap needs it.
# Tokens reserved for TEXT_DOC_SEPARATOR after each document of a text prompt (checked in
# `text_generator_example`, like FRAME_BUDGET in `_frame`).
TEXT_SEP_BUDGET = 2


def template_texts(repeat: int = 100) -> list[str]:
    """Strings a project-trained tokenizer should see so the framing stays a few tokens;
    repeated, so that even a small corpus makes them whole pieces."""
    return [BACKGROUND + "Question: Answer:", PARAPHRASE_QUESTION,
            "Question: " + PARAPHRASE_QUESTION + ANSWER_PREFIX] * repeat


def docs_per_example(config, stage: int) -> int:
    """K: documents in one generator prompt (1 in stage 1, data.num_docs after)."""
    return 1 if stage == 1 else int(config.data.num_docs)


def answer_room(config, stage: int) -> int:
    """Answer tokens (EOS included) a stage's generator sequence holds: stage-1 paraphrase
    targets restate a whole document, so stage 1 also fits data.paraphrase_max_len."""
    d = config.data
    room = int(d.answer_max_len)
    return max(room, int(d.paraphrase_max_len)) if stage == 1 else room


def text_doc_room(doc_max_len: int) -> int:
    """Tokens of a document's text in a text-RAG prompt: what the compressor reads of it
    (data.doc_max_len less the `<ENC> BOS ... EOS` framing)."""
    return int(doc_max_len) - DOC_FRAME


def has_text_rows(config, stage: int) -> bool:
    """Whether a stage's training batches may hold text rows (data.text_share > 0, stages
    2-3)."""
    return stage in (2, 3) and float(config.data.get("text_share", 0.0)) > 0


def generator_length(config, stage: int) -> int:
    """T, the fixed generator sequence length of a training batch."""
    k, m = docs_per_example(config, stage), int(config.model.num_memory_tokens)
    docs = k * (m + 1)
    if has_text_rows(config, stage):
        docs = max(docs, k * (text_doc_room(config.data.doc_max_len) + TEXT_SEP_BUDGET))
    return (FRAME_BUDGET + docs + int(config.data.question_max_len)
            + answer_room(config, stage))


@lru_cache(maxsize=16)
def _frame(tok: Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(BOS + BACKGROUND, QUESTION_PREFIX, ANSWER_PREFIX) ids, cached per tokenizer object."""
    background = [tok.bos_id] + tok.encode(BACKGROUND)
    question, answer = tok.encode(QUESTION_PREFIX), tok.encode(ANSWER_PREFIX)
    used = len(background) + len(question) + len(answer)
    if used > FRAME_BUDGET:
        raise ValueError(f"the prompt framing takes {used} tokens with this tokenizer, more than "
                         f"prompts.FRAME_BUDGET={FRAME_BUDGET}")
    return background, question, answer


@lru_cache(maxsize=16)
def _text_separator(tok: Tokenizer) -> tuple[int, ...]:
    """TEXT_DOC_SEPARATOR's ids, cached per tokenizer object."""
    return tuple(tok.encode(TEXT_DOC_SEPARATOR))


def frame_document(tok: Tokenizer, ids: list[int], length: int) -> tuple[list[int], bool]:
    """`<ENC> BOS ids EOS`, with `ids` cut to fit `length`; returns (framed ids, truncated)."""
    room = length - DOC_FRAME
    if room < 1:
        raise ValueError(f"document length {length} leaves no room for text")
    return [tok.enc_id, tok.bos_id] + ids[:room] + [tok.eos_id], len(ids) > room


def pad_to(ids: list[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids -> (int32[length], bool[length] mask), right-padded."""
    out = np.full((length,), pad_id, np.int32)
    mask = np.zeros((length,), bool)
    out[:len(ids)] = ids
    mask[:len(ids)] = True
    return out, mask


def encode_document(tok: Tokenizer, text: str, length: int
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """A compressor input. Returns (tokens int32[length], mask bool[length], truncated)."""
    framed, truncated = frame_document(tok, tok.encode(text), length)
    tokens, mask = pad_to(framed, length, tok.pad_id)
    return tokens, mask, truncated


def prompt_ids(tok: Tokenizer, question_ids: list[int], num_docs: int, num_memory: int
               ) -> tuple[list[int], list[bool]]:
    """The generator prompt (no answer) with K=num_docs blocks of M slots; returns (ids, slot
    flags) of the same length."""
    background, question, answer = _frame(tok)
    ids, slots = list(background), [False] * len(background)
    for _ in range(num_docs):
        ids += [tok.pad_id] * num_memory + [tok.sep_id]
        slots += [True] * num_memory + [False]
    tail = question + question_ids + answer
    return ids + tail, slots + [False] * len(tail)


def inference_prompt(tok: Tokenizer, question: str, num_docs: int, num_memory: int,
                     question_max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The generator prompt for inference: (tokens int32[P], slot_mask bool[P]), unpadded, with
    num_docs*num_memory True slots. Generation continues after the final "Answer:"."""
    ids, slots = prompt_ids(tok, tok.encode(question)[:question_max_len], num_docs, num_memory)
    return np.asarray(ids, np.int32), np.asarray(slots, bool)


def text_rag_prompt(tok: Tokenizer, question: str, docs: list[str], doc_max_len: int,
                    question_max_len: int) -> np.ndarray:
    """The plain-text RAG baseline prompt: the documents' text (each cut to doc_max_len tokens;
    the RAG pipeline and text training rows give `text_doc_room(data.doc_max_len)`) instead of
    latent slots. Returns tokens int32[P]."""
    return np.asarray(text_prompt_ids(tok, tok.encode(question)[:question_max_len],
                                      [tok.encode(d) for d in docs], doc_max_len), np.int32)


def text_prompt_ids(tok: Tokenizer, question_ids: list[int], doc_ids: list[list[int]],
                    doc_max_len: int) -> list[int]:
    """`text_rag_prompt` from token ids (the question's already cut), as a list."""
    background, question_prefix, answer = _frame(tok)
    sep = list(_text_separator(tok))
    ids = list(background)
    for doc in doc_ids:
        ids += doc[:doc_max_len] + sep
    return ids + question_prefix + question_ids + answer


@dataclass
class GeneratorExample:
    """One training sequence; every array has the fixed length T."""

    tokens: np.ndarray  # int32[T]
    mask: np.ndarray  # bool[T]
    slot_mask: np.ndarray  # bool[T]
    targets: np.ndarray  # int32[T]
    loss_mask: np.ndarray  # bool[T]
    question_truncated: bool
    answer_truncated: bool

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "mask": self.mask, "slot_mask": self.slot_mask,
                "targets": self.targets, "loss_mask": self.loss_mask}


def generator_example(tok: Tokenizer, question: str, answer: str, num_docs: int,
                      num_memory: int, length: int, question_max_len: int,
                      answer_max_len: int) -> GeneratorExample:
    """Prompt + answer as fixed-length training arrays (see the module docstring)."""
    return generator_example_ids(tok, tok.encode(question), tok.encode(ANSWER_SEPARATOR + answer),
                                 num_docs, num_memory, length, question_max_len, answer_max_len)


def generator_example_ids(tok: Tokenizer, q_ids: list[int], a_ids: list[int], num_docs: int,
                          num_memory: int, length: int, question_max_len: int,
                          answer_max_len: int) -> GeneratorExample:
    """`generator_example` from token ids: the question's and the answer's (separator
    included)."""
    prompt, slots = prompt_ids(tok, q_ids[:question_max_len], num_docs, num_memory)
    return _example(tok, prompt, slots, a_ids, length, answer_max_len,
                    len(q_ids) > question_max_len)


def text_generator_example(tok: Tokenizer, question: str, answer: str, docs: list[str],
                           doc_max_len: int, length: int, question_max_len: int,
                           answer_max_len: int) -> GeneratorExample:
    """`generator_example` with the documents' text in the prompt instead of latent slots,
    framed as `text_rag_prompt(tok, question, docs, doc_max_len, question_max_len)` frames
    it at inference (each document cut to doc_max_len tokens); the same answer and loss mask,
    and slot_mask all False."""
    sep = _text_separator(tok)
    if len(sep) > TEXT_SEP_BUDGET:  # generator_length reserved TEXT_SEP_BUDGET per document
        raise ValueError(f"the text prompt's document separator takes {len(sep)} tokens with "
                         f"this tokenizer, more than prompts.TEXT_SEP_BUDGET={TEXT_SEP_BUDGET}")
    q_ids = tok.encode(question)
    prompt = text_prompt_ids(tok, q_ids[:question_max_len], [tok.encode(d) for d in docs],
                             doc_max_len)
    return _example(tok, prompt, [False] * len(prompt), tok.encode(ANSWER_SEPARATOR + answer),
                    length, answer_max_len, len(q_ids) > question_max_len)


def _example(tok: Tokenizer, prompt: list[int], slots: list[bool], a_ids: list[int],
             length: int, answer_max_len: int, question_truncated: bool) -> GeneratorExample:
    """A prompt (with its slot flags) + answer ids -> the fixed-length training arrays."""
    a_room = answer_max_len - 1  # the EOS always fits, so the model learns to stop
    seq = prompt + a_ids[:a_room] + [tok.eos_id]
    n = len(seq) - 1  # positions that have a next token
    if n > length:
        raise ValueError(f"generator sequence of {n} tokens exceeds T={length}")
    tokens, mask = pad_to(seq[:-1], length, tok.pad_id)
    targets, _ = pad_to(seq[1:], length, tok.pad_id)
    slot_mask = np.zeros((length,), bool)
    slot_mask[:len(slots)] = slots  # the prompt is never longer than n
    loss_mask = np.zeros((length,), bool)
    loss_mask[len(prompt) - 1:n] = True
    return GeneratorExample(tokens, mask, slot_mask, targets, loss_mask, question_truncated,
                            len(a_ids) > a_room)
