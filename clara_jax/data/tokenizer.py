"""Tokenizers: one interface over project-trained SentencePiece models and Hugging Face
`tokenizer.json` files.

Both kinds carry the CLaRa special tokens `<ENC>`, `<SEP>`, `<MEM0>`..`<MEM{M-1}>` plus pad, bos
and eos; special tokens are never split (SentencePiece user-defined symbols, Hugging Face added
special tokens). `encode` never adds bos/eos by itself: the prompt formats in
`clara_jax.data.prompts` place every framing token explicitly.

A tokenizer is saved as a directory (`save(dir)`, `load_tokenizer(dir)`) so that it can sit
next to every checkpoint:
  dir/clara_tokenizer.json   kind, special-token names, M
  dir/tokenizer.model        (SentencePiece) or dir/tokenizer.json (Hugging Face)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken
from tokenizers import Tokenizer as RawTokenizer

from clara_jax.fileio import as_path, atomic_write_bytes, file_manifest, read_json

META_FILE = "clara_tokenizer.json"
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

ENC = "<ENC>"
SEP = "<SEP>"
PAD = "<pad>"
UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
# The prompt formats use newlines; SentencePiece reads its corpus line by line and would never
# see one, so "\n" is a user-defined symbol of its own.
NEWLINE = "\n"
# The fixed words of the prompt formats (clara_jax.data.prompts) are single pieces in a
# project-trained model, so the framing costs the same few tokens whatever the corpus.
PROMPT_SYMBOLS = ("Background:", "Question:", "Answer:")


def mem_token(i: int) -> str:
    return f"<MEM{i}>"


class TokenizerError(ValueError):
    """A tokenizer file is missing or inconsistent; the message names the file."""


class Tokenizer:
    """Common interface. Subclasses set the id attributes and implement the text methods.

    Attributes: vocab_size (ids are in [0, vocab_size)), pad_id, bos_id, eos_id, enc_id, sep_id,
    mem_ids (list of M ids), num_memory_tokens (M).
    """

    kind: str = ""
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    enc_id: int
    sep_id: int
    mem_ids: list[int]

    @property
    def num_memory_tokens(self) -> int:
        return len(self.mem_ids)

    @property
    def special_ids(self) -> set[int]:
        return {self.pad_id, self.bos_id, self.eos_id, self.enc_id, self.sep_id, *self.mem_ids}

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without bos/eos."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    def _meta(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size,
                "num_memory_tokens": self.num_memory_tokens,
                "ids": {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id,
                        "enc": self.enc_id, "sep": self.sep_id, "mem": list(self.mem_ids)}}

    def _check_meta(self, meta: dict, path: Path) -> None:
        """A saved tokenizer must come back with the same ids (else checkpoints misread it)."""
        want = meta.get("ids", {})
        have = self._meta()["ids"]
        for name, value in want.items():
            if have.get(name) != value:
                raise TokenizerError(f"{path}: field 'ids.{name}': saved {value}, but the "
                                     f"tokenizer file gives {have.get(name)}")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model trained by the project (`train`) or loaded from `tokenizer.model`.

    Ids 0..3 are pad, unk, bos, eos; then `<ENC>`, `<SEP>`, the M memory tokens, "\\n" and
    PROMPT_SYMBOLS as user-defined symbols (never split); then the learned pieces.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = sp.pad_id(), sp.bos_id(), sp.eos_id()
        self.enc_id, self.sep_id = sp.piece_to_id(ENC), sp.piece_to_id(SEP)
        unk = sp.unk_id()
        self.mem_ids = []
        while (i := sp.piece_to_id(mem_token(len(self.mem_ids)))) != unk:
            self.mem_ids.append(i)
        for name, value in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id),
                            ("<ENC>", self.enc_id), ("<SEP>", self.sep_id)):
            if value < 0 or value == unk:
                raise TokenizerError(f"SentencePiece model has no {name} token")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, num_memory_tokens: int, seed: int = 0,
              model_type: str = "bpe", byte_fallback: bool | None = None,
              extra_texts: Sequence[str] = ()) -> SentencePieceTokenizer:
        """Trains a model on `texts` (plus `extra_texts`, e.g. the prompt templates).

        Deterministic for a given corpus and seed: one thread, no input sampling or shuffling.
        BPE is the default: it trains in well under a second on the bundled world and on the
        800 shared real documents (unigram takes seconds to tens of seconds there).
        `vocab_size` is an upper bound (`hard_vocab_limit=False`): a small corpus may give fewer
        pieces. `byte_fallback` (default: on when vocab_size >= 1024) maps unseen characters to
        byte pieces instead of `<unk>`, at the price of 256 ids.
        """
        if byte_fallback is None:
            byte_fallback = vocab_size >= 1024
        specials = ([ENC, SEP] + [mem_token(i) for i in range(num_memory_tokens)] + [NEWLINE]
                    + list(PROMPT_SYMBOLS))
        lines = [line for t in (*texts, *extra_texts) for line in t.split("\n") if line.strip()]
        if not lines:
            raise TokenizerError("cannot train a SentencePiece model on an empty corpus")
        spm.set_random_generator_seed(int(seed))
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=int(vocab_size),
            model_type=model_type, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            user_defined_symbols=specials, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, hard_vocab_limit=False,
            byte_fallback=byte_fallback, character_coverage=1.0, num_threads=1,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 16,
            split_digits=True, minloglevel=2)
        tok = cls(out.getvalue())
        if tok.vocab_size > vocab_size:
            raise TokenizerError(f"trained {tok.vocab_size} pieces > vocab_size={vocab_size}")
        return tok

    def with_memory_tokens(self, m: int) -> SentencePieceTokenizer:
        """This model serving M = `m` memory tokens, every other id unchanged, so that text
        encodes exactly as before and a model trained with this tokenizer keeps its rows.

        More than now: `<MEM{M}>`.. are appended as user-defined symbols (ids from vocab_size
        on: the model's vocabulary must grow by m - M rows). Fewer: the extra `<MEM i>` are
        renamed `<UNUSED_MEM i>` and marked unused (never produced by encoding), so that ids
        do not shift.
        """
        from sentencepiece import sentencepiece_model_pb2

        if m <= 0:
            raise TokenizerError(f"num_memory_tokens must be positive, got {m}")
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._proto)
        kind = sentencepiece_model_pb2.ModelProto.SentencePiece
        for i in self.mem_ids[m:]:
            piece = proto.pieces[i]
            piece.piece = "<UNUSED_" + piece.piece[1:]
            piece.type = kind.UNUSED
        for j in range(self.num_memory_tokens, m):
            proto.pieces.add(piece=mem_token(j), score=0.0, type=kind.USER_DEFINED)
        return SentencePieceTokenizer(proto.SerializeToString())

    def __getstate__(self):  # for grain worker processes: rebuild from the model bytes
        return {"proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["proto"])

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = self.special_ids
            ids = [i for i in ids if i not in special]
            return self._sp.decode(ids)
        # SentencePiece drops control pieces (pad/bos/eos) when decoding; keep them visible.
        return "".join(self._sp.id_to_piece(i) if self._sp.is_control(i) else self._sp.decode([i])
                       for i in ids)

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        atomic_write_bytes(d / SP_FILE, self._proto)
        atomic_write_bytes(d / META_FILE, json.dumps(self._meta(), indent=2).encode())
        return d


def _hf_token_name(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` package) with the CLaRa specials added.

    `<ENC>`, `<SEP>`, `<MEM i>` (and `<pad>` when the file has no pad token) are appended as
    added special tokens, so their ids come after the checkpoint's own vocabulary: the embedding
    table of an imported checkpoint must be grown to `vocab_size` rows.
    """

    kind = "hf"
    BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "[CLS]")
    EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")
    PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "[PAD]")

    def __init__(self, tokenizer, bos: str, eos: str, pad: str, num_memory_tokens: int):
        self._tok = tokenizer
        self._names = {"bos": bos, "eos": eos, "pad": pad}
        wanted = [pad, ENC, SEP] + [mem_token(i) for i in range(num_memory_tokens)]
        missing = [t for t in dict.fromkeys(wanted) if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing])
        ids = {}
        for name, token in (("bos", bos), ("eos", eos), ("pad", pad), ("enc", ENC),
                            ("sep", SEP)):
            i = tokenizer.token_to_id(token)
            if i is None:
                raise TokenizerError(f"tokenizer.json has no {name} token {token!r}")
            ids[name] = i
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.enc_id, self.sep_id = ids["enc"], ids["sep"]
        self.mem_ids = [tokenizer.token_to_id(mem_token(i)) for i in range(num_memory_tokens)]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_memory_tokens: int, bos: str | None = None,
                  eos: str | None = None, pad: str | None = None) -> HFTokenizer:
        """Loads `tokenizer.json` (path to the file or its directory). Special-token names come
        from the arguments, else `tokenizer_config.json` beside it, else common names."""
        path = as_path(path)
        if path.is_dir():
            path = path / HF_FILE
        if not path.exists():
            raise TokenizerError(f"{path}: no such file")
        try:  # from the text, so that a file on a bucket (gs://) loads too
            raw = RawTokenizer.from_str(path.read_text())
        except Exception as e:  # the tokenizers package raises a bare Exception
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json: {e}") from e
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        return cls.from_raw(raw, config, num_memory_tokens, bos, eos, pad, where=path)

    @classmethod
    def from_raw(cls, raw, config: dict, num_memory_tokens: int, bos: str | None = None,
                 eos: str | None = None, pad: str | None = None,
                 where: str | os.PathLike = HF_FILE) -> HFTokenizer:
        """A loaded `tokenizers.Tokenizer` with its `tokenizer_config.json` dict (special-token
        names as in `from_file`); `where` names the file in errors."""
        vocab = raw.get_vocab(with_added_tokens=True)

        def pick(given, key, candidates, default):
            name = given or _hf_token_name(config, key)
            if name:
                return name
            return next((c for c in candidates if c in vocab), default)

        bos = pick(bos, "bos_token", cls.BOS_CANDIDATES, None)
        eos = pick(eos, "eos_token", cls.EOS_CANDIDATES, None)
        if bos is None or eos is None:
            raise TokenizerError(f"{where}: cannot tell the bos/eos tokens; pass bos= and eos=")
        pad = pick(pad, "pad_token", cls.PAD_CANDIDATES, PAD)
        return cls(raw, bos, eos, pad, num_memory_tokens)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts),
                                                             add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        atomic_write_bytes(d / HF_FILE, self._tok.to_str().encode())
        meta = self._meta() | {"names": self._names}
        atomic_write_bytes(d / META_FILE, json.dumps(meta, indent=2).encode())
        return d


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer saved by `Tokenizer.save(directory)` (a local path or a URL)."""
    d = as_path(directory)
    meta_path = d / META_FILE
    meta = read_json(meta_path, TokenizerError, "no such file (not a saved clara tokenizer)",
                     "tokenizer metadata")
    kind = meta.get("kind")
    if kind == SentencePieceTokenizer.kind:
        tok = SentencePieceTokenizer((d / SP_FILE).read_bytes())
    elif kind == HFTokenizer.kind:
        names = meta.get("names", {})
        tok = HFTokenizer.from_file(d / HF_FILE, int(meta["num_memory_tokens"]),
                                    bos=names.get("bos"), eos=names.get("eos"),
                                    pad=names.get("pad"))
    else:
        raise TokenizerError(f"{meta_path}: field 'kind': unknown tokenizer kind {kind!r}")
    tok._check_meta(meta, meta_path)
    return tok


def saved_digest(directory: str | os.PathLike) -> str:
    """sha256 over the files of a saved tokenizer directory (names and contents): equal for
    two saves of the same tokenizer, so data dirs and workdirs can refuse another one."""
    files = file_manifest(directory)
    return hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()},
                                     sort_keys=True).encode()).hexdigest()


def tokenizer_digest(tok: Tokenizer) -> str:
    """`saved_digest` of `tok` as `tok.save` would write it."""
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        return saved_digest(d)


def load_or_import_tokenizer(path: str | os.PathLike, num_memory_tokens: int) -> Tokenizer:
    """A saved clara tokenizer directory, or else a Hugging Face `tokenizer.json` (file or its
    directory, e.g. an imported checkpoint's) given the CLaRa specials for M memory tokens."""
    p = Path(path)
    if (p / META_FILE).exists():
        return load_tokenizer(p)
    if p.name == HF_FILE or (p / HF_FILE).exists():
        return HFTokenizer.from_file(p, num_memory_tokens)
    raise TokenizerError(f"{p}: neither a saved clara tokenizer ({META_FILE}) nor a Hugging "
                         f"Face {HF_FILE}")


def check_tokenizer_fits(tok: Tokenizer, config) -> None:
    """Raises TokenizerError if `tok` cannot serve the finalized `config` (ids beyond the model's
    vocabulary, or a different number of memory tokens)."""
    v, m = config.model.vocab_size, config.model.num_memory_tokens
    if tok.vocab_size > v:
        raise TokenizerError(f"tokenizer has {tok.vocab_size} ids but config.model.vocab_size="
                             f"{v}")
    if tok.num_memory_tokens != m:
        raise TokenizerError(f"tokenizer has {tok.num_memory_tokens} memory tokens but "
                             f"config.model.num_memory_tokens={m}")
