"""Corpus records for the index: a plain corpus file (`{"id", "title"?, "text"}` per line, read
and validated by `clara_jax.data.formats`) split into compressor-sized chunks and framed for
the compressor (`<ENC> BOS doc EOS`, `clara_jax.data.prompts`).

Documents longer than `doc_max_len - DOC_FRAME` tokens are split into windows with
`chunk_overlap` tokens of overlap; the chunks get ids `"ID#k"` and their text is the decoded
window, exactly as the data pipeline's corpus datasets name them (`formats.document_chunks`,
`pipeline.read_rows`), so ids from the index and from the data agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from clara_jax.data.formats import chunk_windows, document_chunks, iter_jsonl
from clara_jax.data.prompts import DOC_FRAME, frame_document, pad_to
from clara_jax.data.tokenizer import Tokenizer

__all__ = ["chunk_windows", "corpus_records", "make_tokenize", "read_corpus"]


def corpus_records(rows, tok: Tokenizer, doc_max_len: int, chunk_overlap: int
                   ) -> Iterator[dict]:
    """rows: iterable of objects with .id/.title/.text (CorpusRow) -> records
    {'id', 'title', 'text', 'token_ids'} (token_ids: the chunk's unframed ids)."""
    room = doc_max_len - DOC_FRAME
    for row in rows:
        ids = tok.encode(row.text)
        chunks = document_chunks(row.text, ids, tok, room, chunk_overlap)
        for k, ((a, b), text) in enumerate(chunks):
            yield {"id": row.id if len(chunks) == 1 else f"{row.id}#{k}", "title": row.title,
                   "text": text, "token_ids": ids[a:b]}


def read_corpus(path, tok: Tokenizer, doc_max_len: int, chunk_overlap: int,
                skip_bad_rows: bool = False) -> Iterator[dict]:
    """Records of a corpus JSONL file; a bad row raises DataError naming file, line, field."""
    rows = (row for _, row in iter_jsonl(path, "corpus", skip_bad_rows=skip_bad_rows))
    return corpus_records(rows, tok, doc_max_len, chunk_overlap)


def make_tokenize(tok: Tokenizer, doc_max_len: int):
    """records -> (tokens int32[n, doc_max_len], mask bool[n, doc_max_len]), framed and
    right-padded. Uses a record's 'token_ids' when present, else encodes its 'text'."""
    def tokenize(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros((len(records), doc_max_len), np.int32)
        mask = np.zeros((len(records), doc_max_len), bool)
        for i, r in enumerate(records):
            ids = r["token_ids"] if "token_ids" in r else tok.encode(r["text"])
            framed, _ = frame_document(tok, list(ids), doc_max_len)
            tokens[i], mask[i] = pad_to(framed, doc_max_len, tok.pad_id)
        return tokens, mask
    return tokenize
