"""A synthetic batch source that follows the shared batch contract exactly (random tokens),
with the loader interface the trainer expects: iteration, get_state() and set_state().
Used by the training tests and their subprocess scripts."""

from __future__ import annotations

import numpy as np

from clara_jax.train.steps import batch_fields


def make_batch(config, stage: int, rng: np.random.Generator, batch_size: int | None = None):
    """One contract batch: documents (or query and candidates) of random tokens; the generator
    sequence is K x (M slots + separator), a question, and an answer copied from the start of
    the first document (so the latents carry what the answer needs); targets are the next
    tokens, loss_mask marks the answer's targets. Stages 2-3 with data.text_share > 0 also
    hold text rows (drawn with that probability; with 0 < share < 1 row 0 is one and row 1 is
    not, so every batch mixes both): the K documents' tokens (the answer's source first) and a
    separator each in place of the slots, no slots."""
    fields = batch_fields(config, stage, batch_size)
    d = config.data
    m = config.model.num_memory_tokens
    v = config.model.vocab_size
    b, t = fields["tokens"].shape
    k = 1 if stage == 1 else d.num_docs
    td = d.doc_max_len
    out = {}

    def docs(n):
        toks = rng.integers(4, v, size=(b, n, td), dtype=np.int32)
        lens = rng.integers(td // 2, td + 1, size=(b, n))
        mask = np.arange(td)[None, None, :] < lens[..., None]
        return np.where(mask, toks, 0).astype(np.int32), mask

    def query(n_docs):
        pos = rng.integers(0, n_docs, size=(b,)).astype(np.int32)
        pos[0] = -1  # one row with an unknown positive (stage 1: a paraphrase)
        out["pos_index"] = pos
        tq = d.question_max_len
        q = rng.integers(4, v, size=(b, tq), dtype=np.int32)
        qlen = rng.integers(2, tq + 1, size=(b,))
        out["query_mask"] = np.arange(tq)[None] < qlen[:, None]
        out["query_tokens"] = np.where(out["query_mask"], q, 0).astype(np.int32)

    if stage in (1, 2):
        out["doc_tokens"], out["doc_mask"] = docs(k)
        source = out["doc_tokens"][:, 0]
    else:
        c = d.num_candidates
        out["cand_tokens"], out["cand_mask"] = docs(c)
        query(c)
        source = out["cand_tokens"][np.arange(b), np.maximum(out["pos_index"], 0)]

    tokens = np.zeros((b, t), np.int32)
    slot = np.zeros((b, t), bool)
    loss_mask = np.zeros((b, t), bool)
    share = float(d.get("text_share", 0.0)) if stage in (2, 3) else 0.0
    text = np.zeros((b,), bool)
    if share > 0:
        text = rng.random(b) < share
        if share < 1:
            text[:2] = True, False
    for i in range(b):
        seq, s = [1], [False]  # BOS
        if text[i]:
            if stage == 2:
                texts = [out["doc_tokens"][i, j][out["doc_mask"][i, j]] for j in range(k)]
            else:
                gold = max(int(out["pos_index"][i]), 0)
                order = [gold] + [j for j in range(d.num_candidates) if j != gold][:k - 1]
                texts = [out["cand_tokens"][i, j][out["cand_mask"][i, j]] for j in order]
            for doc in texts:
                seq += list(doc[:td - 3]) + [2]  # the text a compressor reads, a separator
                s += [False] * (len(doc[:td - 3]) + 1)
        for _ in range(0 if text[i] else k):
            seq += [0] * m + [2]  # M latent slots, then <SEP>
            s += [True] * m + [False]
        q = list(rng.integers(4, v, size=rng.integers(1, d.question_max_len + 1)))
        seq += q
        s += [False] * len(q)
        start = len(seq)
        ans = list(source[i, :d.answer_max_len]) + [3]  # answer then EOS
        seq += ans
        s += [False] * len(ans)
        n = len(seq)
        tokens[i, :n] = seq
        slot[i, :n] = s
        loss_mask[i, start - 1:n - 1] = True  # logits at t predict token t + 1
    mask = tokens != 0
    mask |= slot
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    out.update(tokens=tokens, mask=mask, slot_mask=slot, targets=targets,
               loss_mask=loss_mask & mask)
    if stage in (1, 2):  # drawn last, so the rest of the batch is as before these fields
        query(k)
    return {k2: out[k2].astype(fields[k2].dtype) for k2 in fields}


class SyntheticLoader:
    """An endless stream of contract batches from a seeded generator; `get_state()` and
    `set_state()` make resume exact. With `fixed=True` it repeats one batch (to overfit)."""

    def __init__(self, config, stage: int, seed: int = 0, fixed: bool = False,
                 batch_size: int | None = None):
        self.config, self.stage, self.seed, self.fixed = config, stage, seed, fixed
        self.batch_size = batch_size
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        i = 0 if self.fixed else self.index
        rng = np.random.default_rng([self.seed, i])
        self.index += 1
        return make_batch(self.config, self.stage, rng, self.batch_size)

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
