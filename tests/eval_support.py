"""Shared set-up of the evaluation and export tests: the bundled world with its tokenizer, a
training checkpoint of the tiny model, a latent index of the held-out corpus, and the
benchmark scripts as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    return load_script(f"bench/{name}.py")


def load_script(path: str):
    """A script of the repository (`bench/x.py`, `projects/demo/x.py`) as a module."""
    path = REPO / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_config(data_dir=None):
    """A new tiny config (the session fixture is shared, so tests do not modify it)."""
    from configs import tiny

    config = tiny.get_config()
    if data_dir is not None:
        config.train.data_dir = str(data_dir)
    return config


def write_world(root: Path, config) -> Path:
    """root/world: the small world's JSONL files and its tokenizer (world/tokenizer)."""
    from clara_jax.data import world
    from clara_jax.data.prepare import world_tokenizer

    out = root / "world"
    world.write_world(out, seed=0, size="small")
    world_tokenizer(config).save(out / "tokenizer")
    return out


def perturbed(params, scale: float = 0.02, seed: int = 1):
    """Random weights with non-zero LoRA B factors, so every adapter changes the outputs."""
    rng = np.random.default_rng(seed)  # numpy: no compilation per leaf shape
    return jax.tree.map(lambda x: jnp.asarray(
        np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype), params)


def save_checkpoint(config, params, workdir: Path) -> None:
    """A training checkpoint as the trainer writes it (orbax, stage 1, step 0)."""
    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.state import create_state

    manager = ckpt.make_manager(workdir, async_save=False)
    ckpt.save(manager, create_state(config, params, 1), None,
              {"stage": 1, "config": config.to_json(), "step": 0})
    manager.wait_until_finished()
    manager.close()


def build_corpus_index(out: Path, corpus: Path, config, cfg, params, tok, limit=None):
    """An index (exact search only) of a corpus file's chunks, as `clara index build` does."""
    from clara_jax.index import build_index
    from clara_jax.index.corpus import make_tokenize, read_corpus

    records = list(read_corpus(corpus, tok, config.data.doc_max_len,
                               config.data.chunk_overlap))
    if limit is not None:
        records = records[:limit]
    return build_index(out, cfg, params, records, make_tokenize(tok, config.data.doc_max_len),
                       scann=False, batch_size=64)


def clara(*args, launcher=None, timeout=300, cwd=REPO):
    """Runs `clara ARGS` from `cwd` (the repository): in this process (a subprocess costs seconds of
    imports and start-up per call), or under a launcher command list (processes of a
    multi-process run) on the CPU. Returns a CompletedProcess either way."""
    if launcher is None:
        code, out, err = clara_in_process(*args, cwd=cwd)
        return subprocess.CompletedProcess(["clara", *map(str, args)], code, out, err)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "clara_jax.cli", *args]
    return subprocess.run(launcher + cmd, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def clara_in_process(*args, cwd=None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `clara ARGS` run in this process (from `cwd` if given)."""
    from clara_jax import cli

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(["clara", *map(str, args)])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)  # what the interpreter does at exit
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()
