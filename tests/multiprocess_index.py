"""Started by launch/local_multiprocess.sh 2 in tests/test_index_multihost.py: each process
opens ROOT/host<p>, which holds only the shards of a 3-shard index that process p opens
(0 and 2 on process 0, 1 on process 1), as separate hosts' disks would; searches its own slice
of ROOT/queries.npy; and writes what it got to OUT/process_<p>.npz and OUT/process_<p>.json.
Also: a 1-shard index (process 1 holds nothing), a search where process 1 has no query,
the id look-ups, and a missing shard reported on both processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from clara_jax import distributed
from clara_jax.fileio import atomic_write_text


def main() -> None:
    assert distributed.initialize()
    import jax

    from clara_jax.index import IndexFileError, open_index

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    p = jax.process_index()
    queries = np.load(root / "queries.npy")
    mine = np.array_split(queries, jax.process_count())[p]
    arrays, facts = {}, {}

    def keep(name, res):
        facts[name] = {"ids": res.ids, "docs": res.docs}
        arrays[f"{name}.scores"] = res.scores
        arrays[f"{name}.shards"] = res.shards
        arrays[f"{name}.rows"] = res.rows
        if res.latents is not None:
            arrays[f"{name}.latents"] = res.latents

    index = open_index(root / f"host{p}")
    facts["type"] = type(index).__name__
    facts["opened"] = {str(i): str(s.path) for i, s in index.local.items()}
    facts["num_docs"] = index.num_docs
    keep("scann", index.search(mine, 5, "scann", fetch=("latents", "docs")))
    keep("exact_deep", index.search(mine, 25, "exact"))  # k above every shard's size
    keep("uneven", index.search(queries if p == 0 else queries[:0], 5, "auto"))
    one = open_index(root / f"one{p}")  # only process 0's disk has the single shard
    facts["one_opened"] = sorted(one.local)
    keep("one", one.search(mine, 5, "scann", fetch=("latents",)))

    live = index.live_ids()
    facts["live_ids"] = live
    wanted = live[p::7][:4]  # each process asks for its own ids
    facts["wanted"] = wanted
    facts["docs"] = index.docs(wanted)
    arrays["latents_of_wanted"] = index.latents(wanted)
    try:
        index.docs(["no such id"] if p == 1 else [])
    except KeyError as e:
        facts["missing_doc"] = str(e)
    try:
        open_index(root / "host0")  # process 1 finds no shard 1 there
    except IndexFileError as e:
        facts["missing_shard"] = str(e)

    np.savez(out / f"process_{p}.npz", **arrays)
    atomic_write_text(out / f"process_{p}.json", json.dumps(facts))


if __name__ == "__main__":
    main()
