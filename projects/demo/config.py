"""The demo's config section (`c.demo`, defined with its defaults by configs/demo.py's
`demo_section`) and its checks, and a config file for the demo on the tiny model:

    python -m projects.demo.run --config=projects/demo/config.py:tiny --workdir=W

`projects/demo/config.py:FILE` takes any library config file (`configs/FILE.py`) and adds the
demo section with its defaults; the demo's own config is configs/demo.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from clara_jax.config import WORLD_SIZES, ConfigError, finalize

REPO = Path(__file__).resolve().parents[2]


def _config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"clara_demo_{name}",
                                                  REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_section() -> ml_collections.ConfigDict:
    """The section's defaults (configs/demo.py's `demo_section`)."""
    return _config_module("demo").demo_section()


def with_demo(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the demo section (its defaults) when it has none."""
    if "demo" not in config:
        config.demo = demo_section()
    return config


def validate_demo(c: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad field of `c.demo`."""
    if "demo" not in c:
        raise ConfigError("config.demo: missing (the demo's section: configs/demo.py, or "
                          "--config=projects/demo/config.py:tiny)")
    dm = c.demo
    for field in ("stage_steps", "stage_lr"):
        if len(dm[field]) != 3 or min(dm[field]) <= 0:
            raise ConfigError(f"config.demo.{field}={tuple(dm[field])!r}: must be 3 positive "
                              "values, one per stage")
    if dm.pretrained and dm.warmup_steps > 0:
        raise ConfigError(f"config.demo.warmup_steps={dm.warmup_steps!r}: must be 0 when "
                          f"starting from demo.pretrained={dm.pretrained!r}")
    if not 0.0 <= dm.swap_answers <= 1.0:
        raise ConfigError(f"config.demo.swap_answers={dm.swap_answers!r}: must be in [0, 1]")
    if dm.world_size not in WORLD_SIZES:
        raise ConfigError(f"config.demo.world_size={dm.world_size!r}: must be one of "
                          f"{WORLD_SIZES} (TRAIN/HELDOUT sizes such as 'medium/small')")


def get_config(arg: str = "tiny"):
    """configs/ARG.py's config with the demo section added (its defaults)."""
    return finalize(with_demo(_config_module(arg).get_config()))
