"""The RAG answer pipeline: questions -> query latents -> top-K from a latent index -> the
generator over the K documents -> answers with the retrieved ids and scores.

Three modes run on the same decoder and generator adapter, so they can be compared:
- `latent` (CLaRa): the K documents' stored latents fill the prompt's K*M slots;
- `text` (standard RAG): the same K documents (retrieved by the same query latents) are given
  as their audit text in the prompt; the index must keep text;
- `closed_book`: no documents, the question alone.

Adaptive refinement: the mean next-token entropy over the first `refine_tokens` answer tokens
measures the generator's uncertainty; rows above `refine_threshold` are answered again, in one
batch, with K + `refine_docs` documents (the next ones of the same search), and are marked
`refined`.

Latent inspection (`inspect_document`): a document's stored latents decoded back to text under
the paraphrase instruction of stage 1, and the nearest documents of those latents.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import numpy as np

from clara_jax.data import prompts
from clara_jax.data.tokenizer import Tokenizer
from clara_jax.index.encode import LatentEncoder
from clara_jax.index.index import SearchResult
from clara_jax.infer.generation import GREEDY, Generation, Generator, Sampling, answer_entropy
from clara_jax.model import ModelConfig

MODES = ("latent", "text", "closed_book")


@dataclasses.dataclass(frozen=True)
class RagSettings:
    """mode: one of MODES; num_docs: K; max_new_tokens: answer length cap N;
    backend: index search backend ('auto', 'scann', 'exact');
    refine_threshold: entropy in nats above which a row is refined (None: never);
    refine_docs: documents added on refinement; refine_tokens: first answer tokens whose mean
    entropy is tested; batch_size: largest generation batch (bigger inputs are split)."""

    mode: str = "latent"
    num_docs: int = 5
    max_new_tokens: int = 32
    sampling: Sampling = GREEDY
    backend: str = "auto"
    refine_threshold: float | None = None
    refine_docs: int = 5
    refine_tokens: int = 4
    batch_size: int = 32

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: must be one of {MODES}")
        for name in ("num_docs", "max_new_tokens", "refine_docs", "refine_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")


@dataclasses.dataclass
class Answer:
    """One answered question. doc_ids / scores: the documents the generator read (none in
    closed-book mode), best first; entropy: mean next-token entropy (nats) over the first
    answer tokens of the answer kept; refined: answered again with more documents."""

    question: str
    answer: str
    mode: str
    doc_ids: list[str]
    scores: list[float]
    entropy: float
    refined: bool
    tokens: list[int]

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "mode": self.mode,
                "doc_ids": self.doc_ids, "scores": [round(s, 6) for s in self.scores],
                "entropy": round(self.entropy, 6), "refined": self.refined}


STAGES = ("query_encoding", "search", "generation")
# What a search fetches with its results for each mode (the generator reads nothing else of
# the index, so a multi-process index sends it with the results: clara_jax.index.multihost).
FETCH_FOR_MODE = {"latent": ("latents",), "text": ("docs",), "closed_book": ()}


@dataclasses.dataclass
class Batch:
    """One batch through `RagPipeline.run`. res: the SearchResult (None in closed-book mode);
    ids: per question the retrieved ids, best first (up to depth; the first k were read);
    scores: float32[Q, depth] cosine scores on the host ([Q, 0] closed-book); gen: the numpy
    Generation (None for no questions); texts: the decoded answers; ms: wall milliseconds per
    stage (STAGES: query encoding, search (with the results' latents or text), generation =
    prompts + the generator + decoding)."""

    res: SearchResult | None
    ids: list[list[str]]
    scores: np.ndarray
    gen: Generation | None
    texts: list[str]
    ms: dict[str, float]


def _batch_buckets(batch_size: int) -> tuple[int, ...]:
    out = [1]
    while out[-1] < batch_size:
        out.append(min(out[-1] * 2, batch_size))
    return tuple(out)


class RagPipeline:
    """Answers questions from a latent index (or closed-book).

    config: the finalized experiment config (data.doc_max_len and data.question_max_len frame
    questions and text documents as in training); cfg, params: the model; tok: its tokenizer;
    index: a `LatentIndex`, `ShardedIndex` or `ProcessShardedIndex` (None allows closed-book
    only), opened with the model's identity so a mismatched compressor is refused; with a
    ProcessShardedIndex every search is a collective, so every process calls `run` / `answer`
    alike (the evaluation job runs in lockstep); mesh: the mesh the params were
    placed on (`clara_jax.infer.serving` loads them onto config.mesh); the query encoder and
    the generator then split every batch over its (data, fsdp) axes. None: one data axis over
    this host's devices for the encoder, the batch wherever the params are for the generator.
    """

    def __init__(self, config, cfg: ModelConfig, params, tok: Tokenizer, index=None,
                 settings: RagSettings = RagSettings(), mesh=None):
        if tok.num_memory_tokens != cfg.num_memory_tokens:
            raise ValueError(f"tokenizer has {tok.num_memory_tokens} memory tokens, the model "
                             f"M={cfg.num_memory_tokens}")
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} ids, the model "
                             f"vocab_size={cfg.vocab_size}")
        if index is not None and (index.m, index.latent_width) != (cfg.num_memory_tokens,
                                                                   cfg.latent_width):
            raise ValueError(f"index latents are [M={index.m}, L={index.latent_width}], the "
                             f"model's [M={cfg.num_memory_tokens}, L={cfg.latent_width}]")
        self.config, self.cfg, self.params, self.tok = config, cfg, params, tok
        self.index, self.settings, self.mesh = index, settings, mesh
        self.doc_max_len = int(config.data.doc_max_len)
        self.question_max_len = int(config.data.question_max_len)
        self._encoder = None
        self._generators: dict[int, Generator] = {}

    # -- building blocks
    def generator(self, max_new_tokens: int | None = None) -> Generator:
        """The cached Generator for a length cap (default: settings.max_new_tokens)."""
        n = max_new_tokens or self.settings.max_new_tokens
        if n not in self._generators:
            self._generators[n] = Generator(
                self.cfg, self.params, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                max_new_tokens=n, batch_buckets=_batch_buckets(self.settings.batch_size),
                mesh=self.mesh)
        return self._generators[n]

    def query_latents(self, questions: Sequence[str]) -> np.ndarray:
        """Questions -> query-reasoner latents float32[Q, M, L] (questions framed like
        documents, cut to data.question_max_len tokens, as in stage-3 training)."""
        if not len(questions):
            return np.zeros((0, self.cfg.num_memory_tokens, self.cfg.latent_width), np.float32)
        if self._encoder is None:
            self._encoder = LatentEncoder(self.cfg, self.params, self.settings.batch_size,
                                          self.mesh, query=True)
        enc = [prompts.encode_document(self.tok, q, self.question_max_len)[:2]
               for q in questions]
        return self._encoder(np.stack([t for t, _ in enc]), np.stack([m for _, m in enc]))

    def retrieve(self, questions: Sequence[str], k: int) -> SearchResult:
        """The top-k documents per question (ids, store rows, cosine scores, stored latents)."""
        return self._search(self.query_latents(questions), k, k, FETCH_FOR_MODE["latent"])

    def _search(self, qlat: np.ndarray, depth: int, need: int, fetch=()) -> SearchResult:
        """The top-`depth` documents of query latents float32[Q, M, L], with what `fetch`
        names (index.FETCH); ValueError unless every question has its first `need` of them
        (a short index would leave holes)."""
        if self.index is None:
            raise ValueError("retrieval needs an index (open one, or use mode='closed_book')")
        res = self.index.search(qlat, depth, self.settings.backend, fetch=fetch)
        if any(d is None for ids in res.ids for d in ids[:need]):
            raise ValueError(f"the index holds {self.index.num_docs} documents, fewer than the "
                             f"{need} asked for per question (lower num_docs / refine_docs)")
        return res

    def doc_latents(self, res: SearchResult, k: int) -> np.ndarray:
        """The stored latents of each row's first k results -> float32[Q, k, M, L] (fetched
        with the search: `retrieve`, or `run` in latent mode)."""
        if res.latents is None:
            raise ValueError("the search result holds no latents (search with "
                             "fetch=('latents',))")
        return res.latents[:, :k]

    def doc_texts(self, res: SearchResult, k: int) -> list[list[str]]:
        """The stored text of each row's first k results (fetched with the search in text
        mode); ValueError naming a document without text."""
        if res.docs is None:
            raise ValueError("the search result holds no documents (search with "
                             "fetch=('docs',))")
        out = []
        for ids, recs in zip(res.ids, res.docs):
            for d, rec in zip(ids[:k], recs[:k]):
                if not (rec or {}).get("text"):
                    raise ValueError(f"document {d!r} has no stored text in {self.index_path};"
                                     " text mode needs an index built with its text kept")
            out.append([rec["text"] for rec in recs[:k]])
        return out

    @property
    def index_path(self) -> str:
        return str(getattr(self.index, "path", "the index"))

    def prompts(self, questions: Sequence[str], doc_ids: Sequence[Sequence[str]], mode: str,
                texts: Sequence[Sequence[str]] | None = None):
        """Generator prompts: (token lists, slot-flag lists or None). texts: text mode's
        documents per question (`doc_texts`)."""
        tok, qmax = self.tok, self.question_max_len
        if mode == "latent":
            k = len(doc_ids[0])
            built = [prompts.inference_prompt(tok, q, k, self.cfg.num_memory_tokens, qmax)
                     for q in questions]
            return [t.tolist() for t, _ in built], [s.tolist() for _, s in built]
        if mode == "text":
            # What the compressor would have read, as in training's text rows.
            room = prompts.text_doc_room(self.doc_max_len)
            if texts is None:
                raise ValueError("text mode needs the documents' texts (doc_texts)")
            return [prompts.text_rag_prompt(tok, q, list(docs), room, qmax).tolist()
                    for q, docs in zip(questions, texts)], None
        return [prompts.prompt_ids(tok, tok.encode(q)[:qmax], 0, self.cfg.num_memory_tokens)[0]
                for q in questions], None

    def _generate(self, questions, doc_ids, mode, res, k, rng) -> Generation:
        texts = self.doc_texts(res, k) if mode == "text" else None
        toks, slots = self.prompts(questions, doc_ids, mode, texts)
        latents = self.doc_latents(res, k) if mode == "latent" else None
        return self.generator()(toks, slots=slots, latents=latents,
                                sampling=self.settings.sampling, rng=rng)

    def _texts(self, gen: Generation) -> list[str]:
        return [self.tok.decode(t[:n].tolist()).strip() for t, n in zip(gen.tokens,
                                                                        gen.lengths)]

    # -- the pipeline
    def run(self, questions: Sequence[str], mode: str, k: int, depth: int | None = None,
            need: int | None = None, rng=None) -> Batch:
        """One batch of questions through retrieve -> generate -> decode, the path both
        `answer` and the evaluation job (clara_jax/eval/job.py) take, timed per stage.

        k: documents the generator reads; depth: documents retrieved (default k; evaluation
        retrieves more for Recall@5, refinement for its second pass); need: how many of them
        every question must get (default k). Closed-book mode retrieves nothing. rng: the
        sampling key (default key(0)). No questions: searches (a collective with a
        ProcessShardedIndex) and generates nothing. Returns a `Batch`."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {MODES}")
        rng = jax.random.key(0) if rng is None else rng
        ms = dict.fromkeys(STAGES, 0.0)
        res, ids = None, [[] for _ in questions]
        scores = np.zeros((len(questions), 0), np.float32)
        if mode != "closed_book":
            t = time.perf_counter()
            qlat = self.query_latents(questions)
            ms["query_encoding"] = 1e3 * (time.perf_counter() - t)
            t = time.perf_counter()
            res = self._search(qlat, depth or k, need or k, FETCH_FOR_MODE[mode])
            ms["search"] = 1e3 * (time.perf_counter() - t)
            ids = [[d for d in row if d is not None] for row in res.ids]
            scores = np.asarray(res.scores, np.float32)  # host copy: no device ops per row
        if not len(questions):
            return Batch(res, [], scores, None, [], ms)
        t = time.perf_counter()
        gen = self._generate(questions, [row[:k] for row in ids], mode, res, k, rng)
        texts = self._texts(gen)
        ms["generation"] = 1e3 * (time.perf_counter() - t)
        return Batch(res, ids, scores, gen, texts, ms)

    def answer(self, questions: Sequence[str], mode: str | None = None, rng=None
               ) -> tuple[list[Answer], dict]:
        """Answers `questions` (strings). Returns (answers, stats) with stats {'questions',
        'refined' (rows answered again), 'mode'}. rng: a key for sampling (default key(0));
        the refinement pass uses fold_in(rng, 1)."""
        s = self.settings
        mode = mode or s.mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {MODES}")
        questions = list(questions)
        if not questions:
            return [], {"questions": 0, "refined": 0, "mode": mode}
        rng = jax.random.key(0) if rng is None else rng
        refine = s.refine_threshold is not None and mode != "closed_book"
        k, k_more = s.num_docs, s.num_docs + (s.refine_docs if refine else 0)
        # Retrieves the refinement's documents up front (one search), and needs them all.
        first = self.run(questions, mode, k, depth=k_more, need=k_more, rng=rng)
        res, gen, texts, scores = first.res, first.gen, first.texts, first.scores
        ids = [row[:k] for row in first.ids]
        entropy = answer_entropy(gen, s.refine_tokens)
        refined = np.zeros(len(questions), bool)
        if refine:
            rows = np.nonzero(entropy > s.refine_threshold)[0]
            if len(rows):
                sub = res.take(rows)
                again = self._generate([questions[r] for r in rows], sub.ids, mode, sub,
                                       k_more, jax.random.fold_in(rng, 1))
                again_texts = self._texts(again)
                again_entropy = answer_entropy(again, s.refine_tokens)
                for j, r in enumerate(rows):
                    texts[r] = again_texts[j]
                    entropy[r] = again_entropy[j]
                    ids[r] = list(res.ids[r])
                    gen.tokens[r, :] = again.tokens[j]
                    gen.lengths[r] = again.lengths[j]
                refined[rows] = True
        answers = []
        for i, q in enumerate(questions):
            n = len(ids[i])
            answers.append(Answer(
                question=q, answer=texts[i], mode=mode, doc_ids=list(ids[i]),
                scores=[float(x) for x in scores[i, :n]], entropy=float(entropy[i]),
                refined=bool(refined[i]), tokens=gen.tokens[i, :gen.lengths[i]].tolist()))
        return answers, {"questions": len(questions), "refined": int(refined.sum()),
                         "mode": mode}

    def inspect_document(self, doc_id: str, max_new_tokens: int | None = None,
                         num_neighbors: int = 5) -> dict:
        """Decodes a document's stored latents back to text with the stage-1 paraphrase
        instruction and lists the nearest other documents of those latents.

        Returns {'id', 'decoded', 'stored' (the audit record), 'neighbors': [{'id', 'score'}]}.
        max_new_tokens defaults to data.doc_max_len (a paraphrase is about a document long)."""
        if self.index is None:
            raise ValueError("inspection needs an index")
        row = self._locate(doc_id)
        lat = row[None, None]  # [1, 1, M, L]
        tok, qmax = self.tok, self.question_max_len
        t, sl = prompts.inference_prompt(tok, prompts.PARAPHRASE_QUESTION, 1,
                                         self.cfg.num_memory_tokens, qmax)
        n = max_new_tokens or min(self.doc_max_len, self.cfg.max_len // 2)
        gen = self.generator(n)([t.tolist()], slots=[sl.tolist()], latents=lat,
                                sampling=self.settings.sampling)
        res = self.index.search(row[None], min(num_neighbors + 1, self.index.num_docs),
                                self.settings.backend)
        neighbors = [{"id": d, "score": round(float(sc), 6)}
                     for d, sc in zip(res.ids[0], res.scores[0])
                     if d is not None and d != doc_id and math.isfinite(float(sc))]
        return {"id": doc_id, "decoded": self._texts(gen)[0], "stored": self.index.doc(doc_id),
                "neighbors": neighbors[:num_neighbors]}

    def _locate(self, doc_id: str) -> np.ndarray:
        """The stored latents of one document -> float32[M, L] (KeyError naming the index
        when it holds no such live document)."""
        return self.index.latents([doc_id])[0]
