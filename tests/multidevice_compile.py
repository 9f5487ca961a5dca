"""Run with 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
`clara compile` on the tiny config over a data=2 x fsdp=4 mesh for train stages 1 and 3,
generate and encode (in this one process, so JAX starts once), bad --mesh values,
--topology without libtpu, and the
sharding-mismatch check against a deliberately different intended sharding. Prints one JSON
line: {"runs": {name: {"rc", "out", "err"}}, "detector": [...]}."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from clara_jax import aot, cli  # noqa: E402
from clara_jax.model.sharding import make_mesh  # noqa: E402
from configs import tiny  # noqa: E402

BASE = ["--config=configs/tiny.py", "--mesh=fsdp=4,data=2", "--config.train.batch_size=8"]
CASES = {
    "train1": ["--stage=1"],
    "train3": ["--stage=3"],
    "generate": ["--what=generate"],
    "encode": ["--what=encode"],
    "encode_small_hbm": ["--what=encode", "--hbm_gib=0.0001"],
    "bad_mesh": ["--mesh=fsdp=3,data=2"],
    "bad_mesh_spec": ["--mesh=fsdp:4"],
}
if importlib.util.find_spec("libtpu") is None:  # else it would compile for the TPU
    CASES["topology_no_libtpu"] = ["--topology=v5e:2x2"]


def run(args: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(["clara", "compile", *args])
        except SystemExit as e:
            rc = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def detector() -> list[str]:
    """aot.sharding_mismatches must name a leaf whose intended sharding differs."""
    config = tiny.get_config()
    mesh = make_mesh(2, 4, 1)
    result = aot.compile_encode(config, mesh, 8)
    params, param_sh = aot._params_in(aot.ModelConfig.from_config(config), mesh)
    leaves, treedef = jax.tree.flatten(param_sh)
    shapes = jax.tree.leaves(params)
    i = next(i for i, s in enumerate(leaves) if "fsdp" in str(s.spec) and len(shapes[i].shape))
    leaves[i] = NamedSharding(mesh, PartitionSpec())
    wrong = jax.tree.unflatten(treedef, leaves)
    return aot.sharding_mismatches(wrong, result.compiled.input_shardings[0][0], params,
                                   "params")


def main() -> None:
    runs = {name: run(BASE + extra) for name, extra in CASES.items()}
    print(json.dumps({"runs": runs, "detector": detector()}))


if __name__ == "__main__":
    main()
