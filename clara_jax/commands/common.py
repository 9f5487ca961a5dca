"""Flags and helpers shared by commands that take an experiment config."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from clara_jax.config import finalize


def define_config_flag() -> None:
    config_flags.DEFINE_config_file(
        "config", None,
        "Experiment config file, e.g. configs/demo.py or configs/mistral_7b.py:compression=128; "
        "override fields with --config.train.steps=50.",
        lock_config=False)


def load_config():
    """The --config flag's ConfigDict, validated again after command-line overrides (which may
    change fields that derived ones depend on)."""
    config = flags.FLAGS.config
    if config is None:
        raise flags.IllegalFlagValueError("--config is required, e.g. --config=configs/demo.py")
    return finalize(config)
