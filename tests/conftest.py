"""Shared fixtures: the tiny config and its model, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))  # makes `configs` importable


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
