"""Shared fixtures: the tiny config and its model, built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole session, set before JAX starts so that
# this process and every subprocess a test launches (demo, benches, CLI runs) share it: the
# tiny model's steps are compiled once instead of once per process. A test that sets its own
# JAX_COMPILATION_CACHE_DIR keeps it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="clara_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))  # makes `configs` importable

from tests.world_support import built  # noqa: E402,F401 (a module-scoped fixture)


@pytest.fixture(scope="session")
def tiny_config():
    from configs import tiny

    return tiny.get_config()


@pytest.fixture(scope="session")
def tiny_cfg(tiny_config):
    from clara_jax.model import ModelConfig

    return ModelConfig.from_config(tiny_config)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    from clara_jax.model import init_params

    return init_params(tiny_cfg, jax.random.key(0))


def one_device_target(config, cfg):
    """`target_for_stage` for `checkpoint.restore_params`: the abstract state of the stage
    (and base training) a checkpoint's metadata names, on a one-axis mesh of all devices."""
    def target(meta):
        from clara_jax.model.sharding import make_mesh
        from clara_jax.train.state import abstract_state, state_shardings

        c = config.copy_and_resolve_references()
        c.train.train_base = bool(meta["train_base"])
        a = abstract_state(c, cfg, int(meta["stage"]))
        return a, state_shardings(cfg, make_mesh(-1, 1, 1), a)
    return target

