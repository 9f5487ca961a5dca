"""Shared fixtures: the tiny config and its model, built once per session."""

from __future__ import annotations

import atexit
import json
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

# Test processes compile far more than they run (a few steps of a tiny model each): LLVM's
# optimisation level 0 cut the CPU time of tests/test_train_steps.py from 139 s to 101 s, at
# the cost of slower execution where a test runs hundreds of steps (the channel test, 188 s ->
# 248 s). Every process a test starts inherits it; `xla_flags(n)` adds n fake CPU devices.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess on `devices` fake CPU devices, with the suite's own flags."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


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


@pytest.fixture(scope="session")
def tiny_start(tmp_path_factory, tiny_config):
    """A real 2-step pretraining run of the tiny model (`projects.demo.pretrain`, batch 4, one
    world worker), made once per suite run and shared by every pytest-xdist worker:
    (directory with tok/, the world tokenizer, and out/, the run's outputs; the run's summary
    as out/pretrain.json holds it). The demo, the quality bench and the pretraining tests
    start from it; the first worker to ask builds it under a lock while the other waits, so
    the suite pays for one run, not one per file. Read-only: a test that changes it copies it.
    `TINY_START_ARGS` are its arguments."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above every worker's own
    root = root / "tiny_start"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "out" / "pretrain.json").exists():
            from clara_jax.data import prepare
            from projects.demo import pretrain

            shutil.rmtree(root, ignore_errors=True)  # a half-made one from a failed build
            prepare.world_tokenizer(tiny_config, 0, "small").save(root / "tok")
            pretrain.pretrain(tiny_config, root / "tok", root / "out", log=lambda _: None,
                              **TINY_START_ARGS)
    return root, json.loads((root / "out" / "pretrain.json").read_text())


TINY_START_ARGS = dict(seconds=1e9, batch_size=4, workers=1, eval_every_s=1e9, size="small",
                       max_steps=2)


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



# `make test` runs two pytest-xdist workers with --dist loadfile: each file goes whole to the
# next free worker, in collection order. xdist's default reorders files by their number of
# tests, which put the files of one or two long tests (a 3-minute training run, a benchmark
# run end to end, 2-process launches) last, so one worker ran them alone at the end while the
# other sat idle. These files, heaviest first by the suite's measured durations, start first
# instead, and the many short files fill in behind them.
HEAVY_FIRST = (
    "tests/test_multiprocess_train.py",
    "tests/test_train_loop.py",
    "tests/test_channel.py",
    "tests/test_quality_bench.py",
    "projects/demo/tests/test_demo.py",
    "tests/test_model.py",
    "tests/test_memory_fit.py",
    "tests/test_train_steps.py",
    "projects/demo/tests/test_pretrain.py",
    "tests/test_faults.py",
    "tests/test_generate.py",
    "tests/test_eval_job.py",
    "projects/demo/tests/test_pretrain_mesh.py",
    "tests/test_serving.py",
    "tests/test_index_cli.py",
    "tests/test_compile.py",
    "tests/test_cloud_workdir.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist's reordering by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

    def key(item):
        try:
            name = item.path.relative_to(REPO).as_posix()
        except ValueError:
            name = ""
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: the order within a file, and of the other files, stays
