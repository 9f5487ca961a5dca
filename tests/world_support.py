"""The small generated world built once per test module, and the single-process loader over
it, shared by the data pipeline's tests and the demo's answer-swap tests."""

from __future__ import annotations

import pytest

from clara_jax.data import pipeline, prepare


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_config):
    """(data dir, prepare summary) of the 'small' world for the tiny config, seed 0."""
    out = tmp_path_factory.mktemp("world")
    summary = prepare.prepare_world(out, tiny_config, seed=0, size="small")
    return out, summary


def single_process_loader(config, stage, data_dir, **kw):
    """`pipeline.make_loader` as process 0 of 1 unless `kw` says otherwise."""
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.make_loader(config, stage, data_dir, **kw)
