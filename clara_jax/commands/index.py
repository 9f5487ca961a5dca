"""`clara index <action>`: build, inspect, search and update latent indexes.

    clara index build  --checkpoint=DIR --corpus=FILE --out=IDX [--dtype=int8] [--key=mean]
                       [--num_shards=N --shard_index=I]   (writes IDX/shard-I-of-N)
    clara index info   --index=IDX
    clara index search --index=IDX --checkpoint=DIR --query="..." [--query=...] [--k=5]
    clara index add    --index=IDX --checkpoint=DIR --corpus=FILE
    clara index delete --index=IDX --ids=a,b,c

--checkpoint is a training run or a converted model (`clara convert from-clara SRC DIR`: a
released model, indexed with no training step). `build` encodes the corpus with the
checkpoint's compressor (jitted, batch sharded over all devices, progress bar) and is
resumable: run the same command again after an interruption. Every action that takes a
checkpoint refuses an index built by another compressor.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import jax
from absl import flags

from clara_jax.commands.common import define_model_flags, define_positive_integer
from clara_jax.data.formats import DataError, check_unique_ids, iter_jsonl
from clara_jax.workdir import lock

FLAGS = flags.FLAGS
ACTIONS = ("build", "info", "search", "add", "delete")

define_model_flags("Training run (WORKDIR or WORKDIR/checkpoints; the latest step is used), "
                   "or a converted model (`clara convert from-clara` / `from-hf` DST).")
flags.DEFINE_string("corpus", None, "Corpus JSONL: {\"id\", \"title\"?, \"text\"} per line.")
flags.DEFINE_string("out", None, "build: the index directory to write.")
flags.DEFINE_string("index", None, "info/search/add/delete: the index directory.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "int8"], "Latent storage type.")
flags.DEFINE_enum("key", "flat", ["flat", "mean"], "Retrieval key: flattened M x L latents "
                  "(the paper's cosine) or their mean over M.")
define_positive_integer("chunk_size", 16384, "Documents per store chunk (the unit of "
                        "resumption).")
define_positive_integer("batch_size", 64, "Documents per compressor call.")
flags.DEFINE_bool("scann", True, "Build a ScaNN searcher (else exact search only).")
flags.DEFINE_integer("scann_leaves", 0, "ScaNN partitions (0: about sqrt(num_docs), none "
                     "below 2000 documents).")
flags.DEFINE_integer("scann_leaves_to_search", 0, "Partitions searched per query (0: 5%, at "
                     "least 24).")
flags.DEFINE_integer("scann_reorder", 100, "Candidates re-scored exactly.")
flags.DEFINE_integer("num_shards", None, "build: number of shards, one per host (default: the "
                     "number of JAX processes, so a multi-process launch builds one each).")
flags.DEFINE_integer("shard_index", None, "build: which shard this run builds (documents i with "
                     "i % num_shards == shard_index; default: this process's index).")
flags.DEFINE_bool("skip_bad_rows", False, "Skip corpus rows that fail validation.")
flags.DEFINE_multi_string("query", [], "search: a question (repeatable).")
flags.DEFINE_integer("k", 5, "search: results per query.")
flags.DEFINE_enum("backend", "auto", ["auto", "scann", "exact"], "search: which searcher.")
flags.DEFINE_list("ids", [], "delete: document ids.")


def _require(action: str, *names: str) -> None:
    missing = [f"--{n}" for n in names if not getattr(FLAGS, n)]
    if missing:
        raise flags.IllegalFlagValueError(f"clara index {action}: {', '.join(missing)} required")


def _scann_params():
    """False, or the ScaNN parameters: auto by corpus size, with the flags' overrides."""
    if not FLAGS.scann:
        return False
    over = {"reorder": FLAGS.scann_reorder}
    if FLAGS.scann_leaves:
        over["num_leaves"] = FLAGS.scann_leaves
        over["leaves_to_search"] = min(FLAGS.scann_leaves, FLAGS.scann_leaves_to_search
                                       or max(24, FLAGS.scann_leaves // 20))
    elif FLAGS.scann_leaves_to_search:
        raise flags.IllegalFlagValueError("--scann_leaves_to_search needs --scann_leaves")
    return over


def _model():
    from clara_jax.infer.serving import load_checkpoint_model

    # One data axis over this host's devices, whatever config.mesh says: the encoder
    # (index.encode.LatentEncoder) runs on that mesh, one index shard per host.
    return load_checkpoint_model(FLAGS.checkpoint, FLAGS.tokenizer,
                                 mesh={"data": -1, "fsdp": 1, "tensor": 1})


def _records(model):
    from clara_jax.index.corpus import read_corpus

    d = model.config.data
    return read_corpus(FLAGS.corpus, model.tokenizer, int(d.doc_max_len), int(d.chunk_overlap),
                       skip_bad_rows=FLAGS.skip_bad_rows)


def _check_corpus() -> None:
    """Reads the whole corpus once before the model is loaded, so a bad row or a duplicate
    id is refused before any document is encoded."""
    check_unique_ids(iter_jsonl(FLAGS.corpus, "corpus", skip_bad_rows=FLAGS.skip_bad_rows),
                     FLAGS.corpus)


def _count_lines(path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def build() -> dict:
    from clara_jax.index import build_index, model_identity, shard_dir_name
    from clara_jax.index.corpus import make_tokenize

    _require("build", "checkpoint", "corpus", "out")
    n = jax.process_count() if FLAGS.num_shards is None else FLAGS.num_shards
    i = jax.process_index() if FLAGS.shard_index is None else FLAGS.shard_index
    if not 0 <= i < n:
        raise flags.IllegalFlagValueError(f"--shard_index={i}: must be in [0, --num_shards={n})")
    out = Path(FLAGS.out) / shard_dir_name(i, n) if n > 1 else Path(FLAGS.out)
    _check_corpus()
    model = _model()
    records = _records(model)
    if n > 1:
        records = itertools.islice(records, i, None, n)
    identity = model_identity(model.cfg, model.params)
    with lock(out, "clara index build"):
        index = build_index(
            out, model.cfg, model.params, records,
            make_tokenize(model.tokenizer, int(model.config.data.doc_max_len)),
            dtype=FLAGS.dtype, key=FLAGS.key, chunk_size=FLAGS.chunk_size,
            batch_size=FLAGS.batch_size, scann=_scann_params(), shard=(i, n), identity=identity,
            extra={"checkpoint": model.source, "step": model.step, "corpus": str(FLAGS.corpus)})
    return _summary(index)


def _summary(index) -> dict:
    m = index.meta
    out = {k: m.get(k) for k in ("num_docs", "latent_shape", "dtype", "key", "build_time",
                                 "build_seconds", "generation", "shard")}
    out["path"] = str(index.path)
    out["identity"] = m["identity"]
    out["scann"] = None if not m.get("scann") else m["scann"]["params"]
    out["extra"] = m.get("extra", {})
    return out


def info() -> dict:
    from clara_jax.index import ShardedIndex, open_index

    _require("info", "index")
    index = open_index(FLAGS.index)
    if isinstance(index, ShardedIndex):
        return {"shards": [_summary(s) for s in index.shards], "num_docs": index.num_docs}
    return _summary(index)


def _open_checked(model):
    from clara_jax.index import model_identity, open_index

    return open_index(FLAGS.index, identity=model_identity(model.cfg, model.params))


def search() -> dict:
    from clara_jax.index import LatentEncoder
    from clara_jax.index.corpus import make_tokenize

    _require("search", "index", "checkpoint", "query")
    model = _model()
    index = _open_checked(model)
    tokens, mask = make_tokenize(model.tokenizer, int(model.config.data.doc_max_len))(
        [{"text": q} for q in FLAGS.query])
    latents = LatentEncoder(model.cfg, model.params, len(FLAGS.query), query=True)(tokens, mask)
    res = index.search(latents, FLAGS.k, backend=FLAGS.backend)
    out = []
    for q, ids, scores in zip(FLAGS.query, res.ids, res.scores):
        hits = [{"id": i, "score": round(float(s), 5), "title": index.doc(i).get("title")}
                for i, s in zip(ids, scores) if i is not None]
        out.append({"query": q, "hits": hits})
    return {"results": out}


def add() -> dict:
    from clara_jax.index import LatentEncoder, LatentIndex
    from clara_jax.index.corpus import make_tokenize

    _require("add", "index", "checkpoint", "corpus")
    _check_corpus()
    model = _model()
    index = _open_checked(model)
    if not isinstance(index, LatentIndex):
        raise flags.IllegalFlagValueError(f"--index={FLAGS.index} is sharded: add to one "
                                          "shard's directory (shard-I-of-N)")
    records = list(_records(model))
    tokens, mask = make_tokenize(model.tokenizer, int(model.config.data.doc_max_len))(records)
    latents = LatentEncoder(model.cfg, model.params, FLAGS.batch_size)(tokens, mask)
    index.add(latents, [r["id"] for r in records], [r.get("title") for r in records],
              [r.get("text") for r in records])
    return _summary(index)


def delete() -> dict:
    from clara_jax.index import ShardedIndex, open_index

    _require("delete", "index", "ids")
    index = open_index(FLAGS.index)
    index.delete(FLAGS.ids)
    if isinstance(index, ShardedIndex):
        return {"shards": [_summary(s) for s in index.shards], "num_docs": index.num_docs}
    return _summary(index)


def _locked(name: str, action):
    """Runs `add` and `delete` holding their index directory's lock (clara_jax/workdir.py);
    `build` locks the (shard) directory it writes itself, `info` and `search` only read."""
    if name not in ("add", "delete") or not FLAGS.index or not Path(FLAGS.index).is_dir():
        return action()  # a missing index is the action's own one-line error
    with lock(FLAGS.index, f"clara index {name}"):
        return action()


def main(argv) -> None:
    from clara_jax.index import IndexFileError, IndexMismatchError

    args = argv[1:]
    if len(args) != 1 or args[0] not in ACTIONS:
        print(f"usage: clara index {{{'|'.join(ACTIONS)}}} [--flags]  (got {args})",
              file=sys.stderr)
        sys.exit(2)
    action = {"build": build, "info": info, "search": search, "add": add,
              "delete": delete}[args[0]]
    try:
        result = _locked(args[0], action)
    except (IndexFileError, IndexMismatchError, DataError, KeyError, FileExistsError,
            flags.IllegalFlagValueError) as e:
        print(f"clara index {args[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))
