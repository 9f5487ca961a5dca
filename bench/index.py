"""Latent-index benchmark: ScaNN versus exact search over clustered latents shaped like the
demo config's (M x L = 8 x 64), at corpus scale.

    .venv/bin/python bench/index.py --num_docs 100000
    .venv/bin/python bench/index.py --num_docs 1000000

The latents are synthetic but structured like a trained compressor's: each document belongs to
one of `num_clusters` topics (a random centre), varies inside its topic along a low-rank
subspace (rank `rank`), and has small isotropic noise. Queries are fresh draws from the same
distribution (unseen documents), so their neighbours are neither the cluster centres nor
copies of stored points. The index is built with the library (`IndexBuilder`: latent store on
disk, keys, ScaNN training + serialisation) and opened back before searching.

Last output line: one JSON object with num_docs, build_s, recall_at_10 (ScaNN against exact),
scann_qps, exact_qps, qps_ratio and bytes_per_doc (float32 and int8 stores as written, the
bundled world's raw text, and the reference's example documents when present, a 768-d
float32 embedding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clara_jax.index.index import IndexBuilder, LatentIndex  # noqa: E402
from clara_jax.index.scann_index import ScannParams  # noqa: E402
from clara_jax.index.search import retrieval_keys  # noqa: E402
from configs import demo  # noqa: E402

BUNDLED = REPO.parent / "shared" / "data" / "ml-clara-example" / "pretrain_data.800.jsonl"


class ClusteredLatents:
    """Generator of latents float32[n, M, L]: topic centre + low-rank in-topic variation +
    isotropic noise. Same seed -> same topics; documents and queries use different streams."""

    def __init__(self, m: int, latent_width: int, num_clusters: int, rank: int, seed: int,
                 spread: float = 0.6, noise: float = 0.15):
        rng = np.random.default_rng(seed)
        d = m * latent_width
        self.shape = (m, latent_width)
        self.centres = rng.standard_normal((num_clusters, d)).astype(np.float32)
        # Per-topic orthonormal directions of variation, scaled so that the in-topic spread
        # per dimension is `spread` of the centres' scale along those directions.
        basis = rng.standard_normal((num_clusters, rank, d)).astype(np.float32)
        basis /= np.linalg.norm(basis, axis=2, keepdims=True)
        self.basis = basis * (spread * math.sqrt(d / rank))
        self.noise = noise
        self.rank = rank

    def sample(self, n: int, rng: np.random.Generator, block: int = 4096) -> np.ndarray:
        out = np.empty((n, self.centres.shape[1]), np.float32)
        for lo in range(0, n, block):  # blocks bound the [block, rank, d] gather
            b = min(block, n - lo)
            c = rng.integers(0, len(self.centres), b)
            z = rng.standard_normal((b, self.rank)).astype(np.float32)
            x = self.centres[c] + np.einsum("nr,nrd->nd", z, self.basis[c])
            out[lo:lo + b] = x + self.noise * rng.standard_normal(x.shape).astype(np.float32)
        return out.reshape(n, *self.shape)


def raw_text_bytes_per_doc() -> dict:
    """Mean UTF-8 bytes per document of the bundled knowledge world's corpus (both splits) and,
    when present, of the reference's example data (shared/data/ml-clara-example)."""
    from clara_jax.data import world

    out = {}
    docs = [d for w in world.make_worlds(0, "small").values() for d in w.docs.values()]
    out["world"] = float(np.mean([len(d.encode("utf-8")) for d in docs]))
    if BUNDLED.exists():
        sizes = []
        with open(BUNDLED, encoding="utf-8") as f:
            for line in f:
                for doc in json.loads(line).get("docs", []):
                    sizes.append(len(doc.encode("utf-8")))
        out["ml_clara_example"] = float(np.mean(sizes))
    return out


def store_bytes(index_dir: Path) -> int:
    return sum(p.stat().st_size for p in (index_dir / "store").glob("*.latents.npy")) + \
        sum(p.stat().st_size for p in (index_dir / "store").glob("*.scales.npy"))


def timed_search(fn, queries, k, repeats):
    fn(queries[:64], k)  # warm-up: compilation / thread pools
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(queries, k)
        best = min(best, time.perf_counter() - t)
    return out, len(queries) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num_docs", type=int, default=100_000)
    ap.add_argument("--num_queries", type=int, default=1000)
    ap.add_argument("--num_clusters", type=int, default=0, help="0: num_docs // 500")
    ap.add_argument("--rank", type=int, default=32, help="in-topic directions of variation")
    ap.add_argument("--spread", type=float, default=0.6,
                    help="in-topic spread relative to the topic centres' scale")
    ap.add_argument("--noise", type=float, default=0.15, help="isotropic noise per dimension")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--num_leaves", type=int, default=0, help="0: ~sqrt(num_docs) * 2")
    ap.add_argument("--leaves_to_search", type=int, default=0,
                    help="0: num_leaves // 64, at least 8")
    ap.add_argument("--reorder", type=int, default=200)
    ap.add_argument("--dims_per_block", type=int, default=2)
    ap.add_argument("--training_sample", type=int, default=100_000)
    ap.add_argument("--chunk_size", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the index is written (temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the index directory")
    ap.add_argument("--reuse", action="store_true",
                    help="search an index kept in --workdir by an earlier run with the same "
                         "--num_docs/--seed instead of building it (build_s is read from its "
                         "metadata); for sweeping search parameters")
    args = ap.parse_args()

    config = demo.get_config()
    m, lw = config.data.doc_max_len // config.data.compression_rate, config.model.latent_dim
    n = args.num_docs
    clusters = args.num_clusters or max(10, n // 500)
    leaves = args.num_leaves or max(16, int(2 * math.sqrt(n)))
    to_search = args.leaves_to_search or max(8, leaves // 64)
    params = ScannParams(num_leaves=leaves, leaves_to_search=to_search,
                         dims_per_block=args.dims_per_block, reorder=args.reorder,
                         training_sample=args.training_sample, num_neighbors=args.k)
    gen = ClusteredLatents(m, lw, clusters, args.rank, args.seed, args.spread, args.noise)
    doc_rng = np.random.default_rng(args.seed + 1)
    query_rng = np.random.default_rng(args.seed + 2)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_index_"))
    out = root / f"index_{n}_seed{args.seed}"
    identity = {"version": 1, "config_hash": "bench-synthetic", "params_checksum": "none",
                "num_memory_tokens": m, "latent_width": lw}
    if args.reuse:
        index = LatentIndex.open(out)
        build_s = index.meta["build_seconds"]
        t_store = index.meta["extra"]["store_write_s"]
        params = ScannParams(**{**index.scann.params.to_json(), "leaves_to_search": to_search,
                                "reorder": args.reorder})
    else:
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        builder = IndexBuilder(out, identity, dtype="float32", chunk_size=args.chunk_size)
        num_chunks = -(-n // args.chunk_size)
        for k in range(num_chunks):
            size = min(args.chunk_size, n - k * args.chunk_size)
            lat = gen.sample(size, doc_rng)
            builder.write_chunk(k, lat, [f"doc{k * args.chunk_size + i}" for i in range(size)])
        t_store = time.perf_counter() - t0
        index = builder.finalize(num_chunks, scann=params,
                                 extra={"store_write_s": round(t_store, 2)})
        build_s = time.perf_counter() - t0
        del index
        index = LatentIndex.open(out)  # searched as a user would: opened from disk
    scann_build_s = index.meta["build_seconds"] - t_store
    f32_bytes = store_bytes(out) / n

    int8_dir = root / f"int8_{n}"
    sample = gen.sample(min(n, 10_000), np.random.default_rng(args.seed + 3))
    b8 = IndexBuilder(int8_dir, identity, dtype="int8", chunk_size=len(sample))
    b8.write_chunk(0, sample, [f"s{i}" for i in range(len(sample))])
    int8_bytes = store_bytes(int8_dir) / len(sample)
    shutil.rmtree(int8_dir)

    queries = retrieval_keys(gen.sample(args.num_queries, query_rng), "flat")
    exact_fn = index.exact_searcher().search
    scann_fn = lambda q, k: index.scann.search(q, k, params.leaves_to_search, params.reorder)
    (ex_rows, _), exact_qps = timed_search(exact_fn, queries, args.k, args.repeats)
    (sc_rows, _), scann_qps = timed_search(scann_fn, queries, args.k, args.repeats)
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ex_rows, sc_rows)]))
    text_bytes = raw_text_bytes_per_doc()
    result = {
        "num_docs": n, "num_queries": args.num_queries, "latent_shape": [m, lw],
        "num_clusters": clusters, "rank": args.rank, "spread": args.spread,
        "noise": args.noise, "build_s": round(build_s, 2),
        "store_write_s": round(t_store, 2), "scann_build_s": round(scann_build_s, 2),
        "recall_at_10": round(recall, 4), "scann_qps": round(scann_qps, 1),
        "exact_qps": round(exact_qps, 1), "qps_ratio": round(scann_qps / exact_qps, 2),
        "scann": params.to_json(), "cpu_count": os.cpu_count(),
        "bytes_per_doc": {
            "float32": round(f32_bytes, 1), "int8": round(int8_bytes, 1),
            "raw_text": round(text_bytes["world"], 1),
            "raw_text_ml_clara_example": (round(text_bytes["ml_clara_example"], 1)
                                          if "ml_clara_example" in text_bytes else None),
            "embedding_768_float32": 768 * 4,
        },
    }
    if not args.keep and not args.reuse:
        shutil.rmtree(out)
        if args.workdir is None:
            shutil.rmtree(root)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
