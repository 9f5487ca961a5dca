"""`clara compile --config=configs/X.py [--topology=v5e:4x4] [--mesh=data=2,fsdp=4,tensor=1]
[--stage=1|2|3] [--what=train|generate|encode] [--hbm_gib=G]`: compiles the real train step,
the KV-cache generate or the corpus encoder ahead of time from abstract inputs only (no params
are allocated) and reports XLA's per-chip memory: arguments, outputs, temporaries and peak,
against the chip's HBM.

Without --topology it compiles for this host's devices (XLA_FLAGS=
--xla_force_host_platform_device_count=8 gives 8 CPU devices); with it, for a TPU slice's
compile-only devices, which needs libtpu (`pip install -e .[tpu-aot]`).

Prints one JSON line to stdout (argument_bytes, output_bytes, alias_bytes, temp_bytes,
peak_bytes, hbm_bytes, fits, compile_s, mesh, sharding_mismatches, ...) and a short table to
stderr. `fits` (peak <= HBM, or <= --hbm_gib) is data, not an error: exit status 0 either
way; 2 on a bad flag or config.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from clara_jax.commands.common import (
    define_config_flag,
    define_positive_integer,
    load_config,
)
from clara_jax.config import ConfigError, finalize
from clara_jax.errors import UserError

define_config_flag()
flags.DEFINE_string("topology", None,
                    "TPU slice to compile for, GENERATION:SHAPE (v5e:2x2, v5e:4x4, v5p:2x2x4, "
                    "v4:2x2x1); needs libtpu (pip install -e .[tpu-aot]). Default: this host's "
                    "devices.")
flags.DEFINE_string("mesh", None,
                    "Mesh axes, e.g. data=2,fsdp=4,tensor=1 (unnamed axes keep config.mesh; "
                    "-1 fills the devices left over).")
flags.DEFINE_integer("stage", None, "Training stage 1-3 for --what=train (default: "
                     "config.train.stage).")
flags.DEFINE_enum("what", "train", ["train", "generate", "encode"],
                  "train: the trainer's step; generate: batched latent-mode generation with "
                  "the KV cache; encode: the index build's compressor on a corpus batch.")
flags.DEFINE_float("hbm_gib", None, "Memory per chip in GiB to check against (default: the "
                   "chip's, from its device kind).")
define_positive_integer("batch", None, "Rows for generate (default train.batch_size) or "
                        "documents for encode (default 64); rounded up to a multiple of data "
                        "x fsdp.")
define_positive_integer("prompt_len", None, "Prompt tokens for generate (default: the stage-3 "
                        "generator prompt: K documents' latent slots, question, framing).")
define_positive_integer("new_tokens", None, "Tokens generated (default data.answer_max_len).")

FLAGS = flags.FLAGS


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def main(argv) -> None:
    from clara_jax import aot
    from clara_jax.train.loop import make_mesh_from_config

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.hbm_gib is not None and FLAGS.hbm_gib <= 0:
        raise UserError(f"--hbm_gib={FLAGS.hbm_gib}: must be positive")
    if FLAGS.stage is not None and FLAGS.stage not in (1, 2, 3):
        raise UserError(f"--stage={FLAGS.stage}: must be 1, 2 or 3")
    config = load_config()
    for axis, size in aot.parse_mesh(FLAGS.mesh).items():
        config.mesh[axis] = size
    if FLAGS.stage is not None:
        config.train.stage = FLAGS.stage
    config = finalize(config)
    # Before any device is touched: libtpu missing is one line, not a traceback.
    devices = aot.topology_devices(FLAGS.topology) if FLAGS.topology else None
    mesh = make_mesh_from_config(config, devices) if FLAGS.what == "train" else _mesh(
        config, devices)
    info = {"what": FLAGS.what, "topology": FLAGS.topology}
    if FLAGS.what == "train":
        stage = int(config.train.stage)
        info["stage"] = stage
        result = aot.compile_train(config, mesh, stage)
    elif FLAGS.what == "generate":
        batch, prompt_len, new_tokens = aot.default_generate_shape(config)
        batch = FLAGS.batch or batch
        prompt_len = FLAGS.prompt_len or prompt_len
        new_tokens = FLAGS.new_tokens or new_tokens
        result = aot.compile_generate(config, mesh, batch, prompt_len, new_tokens)
        info.update(batch=aot.round_to_mesh(batch, mesh), prompt_len=prompt_len,
                    new_tokens=new_tokens, num_docs=int(config.data.num_docs))
    else:
        batch = FLAGS.batch or 64
        result = aot.compile_encode(config, mesh, batch)
        info.update(batch=aot.round_to_mesh(batch, mesh), doc_len=int(config.data.doc_max_len))
    device = mesh.devices.flat[0]
    mem = aot.memory(result.compiled)
    hbm, source = aot.hbm_per_chip(device, FLAGS.hbm_gib, mesh.devices.size)
    out = {**info, "device_kind": str(device.device_kind), "devices": int(mesh.devices.size),
           "mesh": {k: int(v) for k, v in mesh.shape.items()},
           "compile_s": round(result.compile_s, 3),
           "param_bytes": aot.param_bytes_per_chip(config, mesh), **mem,
           "hbm_bytes": hbm, "hbm_source": source,
           "fits": None if hbm is None else mem["peak_bytes"] <= hbm,
           "sharding_mismatches": result.sharding_mismatches}
    _table(out)
    print(json.dumps(out), flush=True)


def _mesh(config, devices):
    """generate / encode: config.mesh over the devices, without the training batch check."""
    from clara_jax.model.sharding import make_mesh

    try:
        return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def _table(out: dict) -> None:
    what = out["what"] + (f" stage {out['stage']}" if "stage" in out else "")
    where = out["topology"] or "this host"
    rows = [("compiled", f"{what} for {where} ({out['devices']} x {out['device_kind']}, mesh "
                         + ",".join(f"{k}={v}" for k, v in out["mesh"].items())
                         + f") in {out['compile_s']:.1f}s"),
            ("params", _mib(out["param_bytes"]) + " per chip (all sizes below are per chip)"),
            ("arguments", _mib(out["argument_bytes"])),
            ("outputs", _mib(out["output_bytes"]) + f" (aliased {_mib(out['alias_bytes'])})"),
            ("temporaries", _mib(out["temp_bytes"])),
            ("peak", _mib(out["peak_bytes"])),
            ("HBM", f"{_mib(out['hbm_bytes'])} ({out['hbm_source']})"),
            ("fits", {True: "yes", False: "NO", None: "unknown"}[out["fits"]]),
            ("shardings", "as intended" if not out["sharding_mismatches"] else
             f"{len(out['sharding_mismatches'])} differ: "
             + "; ".join(out["sharding_mismatches"][:3]))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), file=sys.stderr, flush=True)
