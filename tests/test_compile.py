"""`clara compile`: the real train / generate / encode steps compiled ahead of time on an
8-device CPU mesh from abstract inputs, the report's fields, `fits` as data, one-line errors,
and (only where libtpu is installed) a compile for a TPU topology."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
FIELDS = ("what", "device_kind", "devices", "mesh", "compile_s", "param_bytes",
          "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes",
          "hbm_bytes", "hbm_source", "fits", "sharding_mismatches")


def _clara(*args, env=None, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu") if env is None else env
    return subprocess.run([sys.executable, "-m", "clara_jax.cli", "compile", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_compile.py")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _report(runs, name) -> dict:
    run = runs["runs"][name]
    assert run["rc"] == 0, run["err"][-3000:]
    lines = run["out"].strip().splitlines()
    assert len(lines) == 1, run["out"]  # one JSON line on stdout; the table is on stderr
    assert "peak" in run["err"] and "fits" in run["err"]
    return json.loads(lines[0])


@pytest.mark.parametrize("name,what,stage", [("train1", "train", 1), ("train3", "train", 3),
                                             ("generate", "generate", None),
                                             ("encode", "encode", None)])
def test_compiles_on_8_devices_as_intended_and_fits(runs, name, what, stage):
    out = _report(runs, name)
    for field in FIELDS:
        assert field in out, field
    assert out["what"] == what and out.get("stage") == stage
    assert out["devices"] == 8 and out["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert out["sharding_mismatches"] == []
    assert out["fits"] is True
    assert 0 < out["argument_bytes"] <= out["peak_bytes"] <= out["hbm_bytes"]
    assert out["compile_s"] > 0
    if what == "train":  # the state is donated: its buffers come back as the outputs
        assert out["alias_bytes"] > 0
    if what in ("generate", "encode"):
        assert out["batch"] % 8 == 0


def test_small_hbm_does_not_fit_but_exits_0(runs):
    out = _report(runs, "encode_small_hbm")
    assert out["fits"] is False
    assert out["hbm_bytes"] == int(0.0001 * 2**30) and out["hbm_source"] == "--hbm_gib"
    assert "NO" in runs["runs"]["encode_small_hbm"]["err"]


def test_bad_mesh_is_one_line(runs):
    run = runs["runs"]["bad_mesh"]
    assert run["rc"] == 2 and run["out"] == ""
    assert run["err"].strip().count("\n") == 0, run["err"]
    assert run["err"].startswith("clara compile: ") and "mesh" in run["err"]


def test_mismatch_check_names_the_leaf_that_differs(runs):
    found = runs["detector"]
    assert len(found) == 1, found
    assert found[0].startswith("params[") and "intended P()" in found[0]


def test_bad_mesh_spec_is_one_line(runs):
    run = runs["runs"]["bad_mesh_spec"]
    assert run["rc"] == 2 and run["out"] == ""
    assert run["err"].strip() == ("clara compile: --mesh=fsdp:4: give AXIS=SIZE pairs "
                                  "separated by commas, AXIS one of data, fsdp, tensor (e.g. "
                                  "--mesh=data=2,fsdp=4,tensor=1)")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed: --topology works here")
def test_topology_without_libtpu_says_how_to_install(runs):
    run = runs["runs"]["topology_no_libtpu"]
    assert run["rc"] == 2 and run["out"] == ""
    line = run["err"].strip()
    assert "\n" not in line, run["err"]
    assert line.startswith("clara compile: --topology=v5e:2x2 needs libtpu")
    assert "pip install -e .[tpu-aot]" in line


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e .[tpu-aot])")
def test_tiny_compiles_for_v5e_2x2_topology():
    """Slow (about 30 s on 2 cores): the stage-1 step compiled by libtpu for 4 v5e chips."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    res = _clara("--config=configs/tiny.py", "--topology=v5e:2x2", "--mesh=data=1,fsdp=4",
                 "--stage=1", env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["topology"] == "v5e:2x2" and out["devices"] == 4
    assert out["device_kind"] == "TPU v5 lite" and out["hbm_bytes"] == 16 * 2**30
    assert out["sharding_mismatches"] == [] and out["fits"] is True
