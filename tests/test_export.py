"""The serving bundle (clara_jax/export/bundle.py, `clara export`, `clara ask --bundle`): a few
training steps of the tiny model, an index of held-out documents, the export; the bundle's
safetensors hold exactly the params, and after the workdir, the data and the original index are
deleted and the bundle is moved, `clara ask --bundle` answers exactly as from the workdir."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from clara_jax import param_store
from clara_jax.export import bundle as B
from tests import eval_support as es

QUESTIONS = ["What is the capital of Mochakora?", "Who founded the Ordo Lumen?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.infer.serving import load_checkpoint_model
    from clara_jax.train.loop import train
    from tests.train_support import SyntheticLoader

    root = tmp_path_factory.mktemp("export")
    config = es.fresh_config(root / "world")
    world_dir = es.write_world(root, config)
    config.train.steps = 3
    config.train.checkpoint_every = 3
    config.train.log_every = 1
    result = train(config, root / "run", lambda c, stage, split: SyntheticLoader(c, stage),
                   progress=False)
    assert result.status == "done" and result.step == 3
    loaded = load_checkpoint_model(root / "run")
    tok = load_tokenizer(world_dir / "tokenizer")
    es.build_corpus_index(root / "idx", world_dir / "heldout" / "corpus.jsonl", config,
                          loaded.cfg, loaded.params, tok, limit=40)
    return root, loaded


def _leaves(params):
    return param_store.flatten(params)


# Runs first: the test after it deletes the workdir, the data and the index.
def test_export_refuses_another_compressors_index(setup, tmp_path, tiny_params):
    from clara_jax.index import IndexMismatchError
    from clara_jax.model import ModelConfig

    root, loaded = setup
    other = tmp_path / "other_idx"
    config = es.fresh_config()
    es.build_corpus_index(other, root / "world" / "heldout" / "corpus.jsonl", config,
                          ModelConfig.from_config(config), tiny_params, loaded.tokenizer,
                          limit=8)
    with pytest.raises(IndexMismatchError, match="params_checksum"):
        B.export_bundle(root / "run", tmp_path / "b", index=other, progress=False)
    assert not (tmp_path / "b").exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(B.BundleError, match="not empty"):
        B.export_bundle(root / "run", tmp_path / "full", index=None, progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_export_then_ask_without_the_workdir(setup, tmp_path):
    from safetensors.numpy import load_file

    from clara_jax.convert import hf
    from clara_jax.model import param_group

    root, loaded = setup
    want = _leaves(loaded.params)
    # Training moved the adapters away from their zero init: the bundle must carry them.
    assert any(np.abs(v).max() > 0 for k, v in want.items() if "lora_generator_b" in k)
    p = es.clara("export", f"--checkpoint={root / 'run'}", f"--index={root / 'idx'}",
                 f"--out={tmp_path / 'bundle'}", "--noprogress")
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads(p.stdout.strip().splitlines()[-1])
    assert meta == json.loads((tmp_path / "bundle" / B.META_FILE).read_text())
    assert meta["source"]["step"] == 3 and meta["index"]["num_docs"] == 40
    assert meta["versions"]["jax"] == jax.__version__
    # No temporary directory left; the writer's lock file (clara_jax/workdir.py) stays.
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == [
        ".bundle.clara.lock"]

    bundle = tmp_path / "bundle"
    # Adapters, memory embeddings and projections: exactly the non-base leaves.
    extra = load_file(str(bundle / B.CLARA_PARAMS_FILE))
    non_base = {k: v for k, v in want.items()
                if param_group([jax.tree_util.DictKey(s) for s in k.split("/")]) != "base"}
    assert set(extra) == set(non_base) and extra
    for k, v in non_base.items():
        np.testing.assert_array_equal(extra[k], v)
    # The decoder safetensors read back (Hugging Face layout) to the base leaves.
    overrides = {f: getattr(loaded.cfg, f) for f in hf.OVERRIDABLE}
    _, dec = hf.load(bundle / B.DECODER_DIR, progress=False, **overrides)
    dec = _leaves(dec)
    base = [k for k in want if k not in non_base]
    for k in base:
        np.testing.assert_array_equal(dec[k], want[k])

    ask = ["--mode=latent", "--backend=exact", *QUESTIONS]
    from_run = es.clara("ask", f"--checkpoint={root / 'run'}", f"--index={root / 'idx'}", *ask)
    assert from_run.returncode == 0, from_run.stderr[-3000:]
    # No training workdir, data (tokenizer) or original index any more; the bundle moved.
    for d in ("run", "world", "idx"):
        shutil.rmtree(root / d)
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(bundle, moved)
    from_bundle = es.clara("ask", f"--bundle={moved}", *ask)
    assert from_bundle.returncode == 0, from_bundle.stderr[-3000:]
    a = [json.loads(x) for x in from_run.stdout.splitlines()]
    b = [json.loads(x) for x in from_bundle.stdout.splitlines()]
    assert len(a) == len(QUESTIONS) and a == b

    # The Python loader restores every leaf exactly; a truncated file is named.
    got = _leaves(B.load_bundle(moved).model.params)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    f = moved / B.CLARA_PARAMS_FILE
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(B.BundleError, match="clara_params.safetensors"):
        B.load_bundle(moved)
