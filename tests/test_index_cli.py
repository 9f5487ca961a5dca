"""`clara index build/info/search/delete` end to end on a real (step-0) training checkpoint,
the bundled world's corpus and its tokenizer; a checkpoint with other weights is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from tests import eval_support as es


def _checkpoint(config, params, workdir):
    """A training checkpoint as the trainer writes it (orbax, stage 1, step 0)."""
    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.state import create_state

    manager = ckpt.make_manager(workdir, async_save=False)
    ckpt.save(manager, create_state(config, params, 1), None,
              {"stage": 1, "config": config.to_json(), "step": 0})
    manager.wait_until_finished()
    manager.close()


def _clara(*args, ok=True, command="index"):
    """`clara index ARGS` (or another command) in this process (tests/eval_support.clara);
    the 2-process build test below runs the real entry point."""
    p = es.clara(command, *args)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def setup(tiny_config, tiny_params, tmp_path_factory):
    from clara_jax.data import world
    from clara_jax.data.prepare import world_tokenizer

    root = tmp_path_factory.mktemp("cli")
    world.write_world(root / "world", seed=0, size="small")
    world_tokenizer(tiny_config).save(root / "tok")
    lines = (root / "world" / "train" / "corpus.jsonl").read_text().splitlines()[:30]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    _checkpoint(tiny_config, tiny_params, root / "run")
    other = jax.tree.map(lambda x: x + 0.01, tiny_params)
    _checkpoint(tiny_config, other, root / "other")
    return root


def test_build_info_search_delete(setup):
    root = setup
    common = [f"--tokenizer={root / 'tok'}"]
    p = _clara("build", f"--checkpoint={root / 'run'}", f"--corpus={root / 'corpus.jsonl'}",
               f"--out={root / 'idx'}", "--dtype=int8", "--chunk_size=64", *common)
    built = json.loads(p.stdout)
    assert built["dtype"] == "int8" and built["num_docs"] > 30  # long documents split
    assert built["extra"]["step"] == 0 and built["identity"]["params_checksum"]

    info = json.loads(_clara("info", f"--index={root / 'idx'}").stdout)
    assert info["num_docs"] == built["num_docs"]

    first = json.loads((root / "corpus.jsonl").read_text().splitlines()[0])
    p = _clara("search", f"--index={root / 'idx'}", f"--checkpoint={root / 'run'}",
               f"--query={first['text'][:60]}", "--query=who founded it?", "--k=3", *common)
    res = json.loads(p.stdout)["results"]
    assert len(res) == 2 and all(len(r["hits"]) == 3 for r in res)

    # Another compressor's weights: refused with the reason, nothing printed as results.
    p = _clara("search", f"--index={root / 'idx'}", f"--checkpoint={root / 'other'}",
               "--query=x", *common, ok=False)
    assert p.returncode == 2 and "different compressor" in p.stderr
    assert "params_checksum" in p.stderr

    victim = res[0]["hits"][0]["id"]
    after = json.loads(_clara("delete", f"--index={root / 'idx'}", f"--ids={victim}").stdout)
    assert after["num_docs"] == built["num_docs"] - 1
    # A chunked document's plain id deletes all its chunks.
    from clara_jax.index import LatentIndex

    live = LatentIndex.open(root / "idx").live_ids()
    doc = next(i.rpartition("#")[0] for i in live if i.endswith("#1"))
    chunks = [i for i in live if i.rpartition("#")[0] == doc]
    p = _clara(f"--checkpoint={root / 'run'}", f"--index={root / 'idx'}", *common,
               f"--doc={doc}", "--max_new_tokens=2", "--neighbors=1", "--backend=exact",
               command="inspect")
    assert [json.loads(x)["id"] for x in p.stdout.splitlines()] == chunks
    again = json.loads(_clara("delete", f"--index={root / 'idx'}", f"--ids={doc}").stdout)
    assert len(chunks) >= 2 and again["num_docs"] == after["num_docs"] - len(chunks)
    p = _clara("delete", f"--index={root / 'idx'}", f"--ids={doc}", ok=False)
    assert p.returncode == 2 and f"nor is any chunk {doc}#k" in p.stderr

    p = _clara("build", f"--checkpoint={root / 'run'}", f"--corpus={root / 'missing.jsonl'}",
               f"--out={root / 'idx2'}", *common, ok=False)
    assert p.returncode == 2 and "missing.jsonl" in p.stderr



def test_two_process_build_equals_one_process_build(setup):
    """Each process of a 2-process launch encodes its slice into its own shard; searching the
    sharded index gives the 1-process index's results."""
    import numpy as np

    from clara_jax.index import ShardedIndex, open_index
    from tests.conftest import REPO

    root = setup
    args = [sys.executable, "-m", "clara_jax.cli", "index", "build",
            f"--checkpoint={root / 'run'}", f"--corpus={root / 'corpus.jsonl'}",
            f"--tokenizer={root / 'tok'}"]
    one = subprocess.run(args + [f"--out={root / 'one'}"], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [str(REPO / "launch" / "local_multiprocess.sh"), "2", "--logdir", str(root / "logs"),
         "--", *args, f"--out={root / 'two'}"], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    single, sharded = open_index(root / "one"), open_index(root / "two")
    assert isinstance(sharded, ShardedIndex) and len(sharded.shards) == 2
    assert sharded.num_docs == single.num_docs
    m, lw = single.meta["latent_shape"][1:]
    queries = np.random.default_rng(0).normal(size=(8, m, lw)).astype(np.float32)
    a = single.search(queries, k=5, backend="exact")
    b = sharded.search(queries, k=5, backend="exact")
    assert [list(r) for r in a.ids] == [list(r) for r in b.ids]
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
