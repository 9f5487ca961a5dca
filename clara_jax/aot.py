"""Ahead-of-time compilation of the real train, generate and encode steps from abstract inputs
only (ShapeDtypeStructs with shardings): nothing is allocated, so a config can be sized for a
pod slice from a laptop. `clara compile` is the command-line face of this module.

The mesh is built over this host's devices or over a TPU topology's compile-only devices
(`jax.experimental.topologies.get_topology_desc`, which needs libtpu: `pip install -e
.[tpu-aot]`). Each compile returns a `Compiled` holding XLA's per-chip memory analysis and the
inputs whose compiled sharding differs from the one the project's rules intend.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax.data import prompts
from clara_jax.errors import UserError
from clara_jax.index.encode import encode_fn
from clara_jax.infer.generation import GREEDY, generate_padded
from clara_jax.model import ModelConfig, abstract_params, compress, param_shardings
from clara_jax.model.sharding import MESH_AXES, batch_sharding
from clara_jax.train.state import abstract_state, state_shardings
from clara_jax.train.steps import batch_fields, compile_train_step, make_train_step

WHAT = ("train", "generate", "encode")
TPU_AOT_INSTALL = "pip install -e .[tpu-aot]"

GIB = 2**30
# Per-chip HBM of known accelerators, matched against a lower-cased device_kind, most specific
# first ("tpu v5 lite" is v5e; a bare "tpu v5" is v5p).
HBM_GIB: tuple[tuple[str, float], ...] = (
    ("tpu v5 lite", 16), ("tpu v5e", 16), ("tpu v5p", 95), ("tpu v5", 95),
    ("tpu v6 lite", 32), ("tpu v6e", 32), ("tpu v4", 32),
    ("h200", 141), ("h100", 80),
)


@dataclasses.dataclass
class Compiled:
    compiled: object  # jax.stages.Compiled
    mesh: object
    compile_s: float
    sharding_mismatches: list[str]


def parse_mesh(spec: str | None) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' (any subset, any order) -> {'data': 2, 'fsdp': 4, ...}."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in MESH_AXES:
            raise UserError(f"--mesh={spec}: give AXIS=SIZE pairs separated by commas, AXIS one "
                            f"of {', '.join(MESH_AXES)} (e.g. --mesh=data=2,fsdp=4,tensor=1)")
        try:
            size = int(value)
        except ValueError:
            raise UserError(f"--mesh={spec}: {name}={value!r} is not an integer") from None
        if size == 0 or size < -1:
            raise UserError(f"--mesh={spec}: {name}={size} must be positive, or -1 to fill")
        if name in out:
            raise UserError(f"--mesh={spec}: {name} given twice")
        out[name] = size
    return out


def topology_devices(name: str):
    """The compile-only devices of TPU topology `name` (e.g. 'v5e:4x4', 'v5p:2x2x4').
    UserError, in one line, when libtpu is not installed or the name is unknown to it."""
    try:  # libtpu is optional (the tpu-aot extra): looked for only when a topology is asked
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError(f"--topology={name} needs libtpu, which is not installed: "
                        f"{TPU_AOT_INSTALL} (installs jax[tpu] at this jax's version)") from None
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's errors for unknown names are RuntimeErrors / XlaErrors
        msg = " ".join(str(e).split())
        raise UserError(f"--topology={name}: libtpu cannot build this topology ({msg}); give "
                        "GENERATION:SHAPE such as v5e:2x2, v5e:4x4, v5p:2x2x4, v4:2x2x1"
                        ) from None


def by_device_kind(device, table: tuple[tuple[str, float], ...]) -> float | None:
    """The value of the first key of `table` (most specific first, as HBM_GIB) contained in
    the device's lower-cased device_kind; None for a kind the table does not know."""
    kind = str(getattr(device, "device_kind", "")).lower()
    return next((value for key, value in table if key in kind), None)


def hbm_per_chip(device, hbm_gib: float | None, n_devices: int) -> tuple[int | None, str]:
    """(bytes, where the number comes from) of one chip's memory: --hbm_gib when given, else
    the known-chip table by device_kind, else the device's own memory_stats, else for CPU
    devices this host's RAM split over the mesh's devices."""
    if hbm_gib is not None:
        return int(hbm_gib * GIB), "--hbm_gib"
    gib = by_device_kind(device, HBM_GIB)
    if gib is not None:
        return int(gib * GIB), f"table ({device.device_kind})"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # compile-only devices have no runtime to ask
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device memory_stats"
    if getattr(device, "platform", "") == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None, "unknown (pass --hbm_gib)"
        return ram // max(n_devices, 1), f"host RAM / {n_devices} devices"
    return None, f"unknown device kind {getattr(device, 'device_kind', '?')!r} (pass --hbm_gib)"


def memory(compiled) -> dict[str, int]:
    """Per-chip bytes from XLA's memory analysis: arguments, outputs, aliased (donated
    arguments reused as outputs), temporaries, generated code, XLA's own peak estimate and
    `peak_bytes`: the larger of that estimate and arguments + outputs - aliased +
    temporaries (the buffers the program holds at once when its temporaries are one
    allocation, as on TPU and GPU; the CPU backend's estimate leaves the temporaries out)."""
    m = compiled.memory_analysis()
    if m is None:
        raise UserError("this backend gives no memory analysis of a compiled program")
    out = {"argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes),
           "code_bytes": int(m.generated_code_size_in_bytes)}
    out["xla_peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    out["peak_bytes"] = max(out["xla_peak_bytes"], out["argument_bytes"] + out["output_bytes"]
                            - out["alias_bytes"] + out["temp_bytes"])
    return out


def sharding_mismatches(intended, compiled_shardings, abstract, prefix: str) -> list[str]:
    """Paths (under `prefix`) of leaves whose compiled input sharding is not equivalent to
    the intended one."""
    want = jax.tree_util.tree_leaves_with_path(intended)
    # An input XLA dropped as unused has sharding None; keep it so the leaves line up.
    got = jax.tree.leaves(compiled_shardings, is_leaf=lambda x: x is None)
    shapes = jax.tree.leaves(abstract)
    if len(want) != len(got):
        return [f"{prefix}: {len(got)} compiled input shardings for {len(want)} leaves"]
    bad = []
    for (path, w), g, leaf in zip(want, got, shapes):
        if g is None:  # the input was dropped as unused; it has no placement to check
            continue
        if not w.is_equivalent_to(g, len(leaf.shape)):
            bad.append(f"{prefix}{jax.tree_util.keystr(path)}: intended {_spec(w)}, "
                       f"compiled {_spec(g)}")
    return bad


def _spec(s) -> str:
    return str(getattr(s, "spec", s))


def _timed_compile(lower):
    t0 = time.perf_counter()
    compiled = lower()
    return compiled, time.perf_counter() - t0


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def compile_train(config: ml_collections.ConfigDict, mesh, stage: int) -> Compiled:
    """The trainer's step for `stage` (`make_train_step` under `compile_train_step`, as
    `clara train` compiles it) on the contract's batch fields."""
    cfg = ModelConfig.from_config(config)
    abstract = abstract_state(config, cfg, stage)
    shardings = state_shardings(cfg, mesh, abstract)
    fields = batch_fields(config, stage)
    step_fn = make_train_step(config, cfg, stage, abstract.params)
    (compiled, _), secs = _timed_compile(
        lambda: compile_train_step(step_fn, mesh, shardings, abstract, fields))
    state_in = compiled.input_shardings[0][0]
    bad = (sharding_mismatches(shardings.params, state_in.params, abstract.params, "params")
           + sharding_mismatches(shardings.opt_state, state_in.opt_state, abstract.opt_state,
                                 "opt_state"))
    return Compiled(compiled, mesh, secs, bad)


def default_generate_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(batch, prompt_len, new_tokens) of an inference batch: train.batch_size prompts of the
    stage-3 generator prompt (K documents' latent slots + question + framing), answers of
    data.answer_max_len tokens."""
    prompt_len = prompts.generator_length(config, 3) - prompts.answer_room(config, 3)
    return int(config.train.batch_size), int(prompt_len), int(config.data.answer_max_len)


def round_to_mesh(n: int, mesh) -> int:
    per = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
    return -(-n // per) * per


def _params_in(cfg: ModelConfig, mesh):
    params = abstract_params(cfg)
    param_sh = param_shardings(cfg, mesh)
    return params, param_sh


def compile_generate(config: ml_collections.ConfigDict, mesh, batch: int, prompt_len: int,
                     new_tokens: int) -> Compiled:
    """`generate_padded` (prefill + KV-cache decode loop) in latent mode, as the RAG pipeline
    calls it: the K = data.num_docs documents' latents in the prompt's slots, params on their
    logical shardings, the batch split over (data, fsdp). `batch` is rounded up to a multiple
    of data x fsdp, as `Generator` rounds its buckets."""
    cfg = ModelConfig.from_config(config)
    if prompt_len + new_tokens > cfg.max_len:
        raise UserError(f"--prompt_len={prompt_len} + --new_tokens={new_tokens} exceeds "
                        f"model.max_len={cfg.max_len} (the KV cache holds both)")
    b = round_to_mesh(batch, mesh)
    params, param_sh = _params_in(cfg, mesh)
    k = int(config.data.num_docs)
    lat = jax.eval_shape(lambda p, t, m: compress(cfg, p, t, m), params,
                         jax.ShapeDtypeStruct((1, config.data.doc_max_len), jnp.int32),
                         jax.ShapeDtypeStruct((1, config.data.doc_max_len), bool))

    def batched(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))

    replicated = NamedSharding(mesh, PartitionSpec())

    def scalar(dtype, shape=()):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    args = (_with_sharding(params, param_sh),
            batched((b, prompt_len), jnp.int32), batched((b, prompt_len), bool),
            batched((b, prompt_len), bool), batched((b, k) + lat.shape[1:], lat.dtype),
            scalar(jax.eval_shape(lambda: jax.random.key(0)).dtype),
            scalar(jnp.int32), scalar(jnp.int32),
            tuple(scalar(v.dtype) for v in jax.eval_shape(GREEDY.as_arrays)))

    def lower():  # as `Generator` calls it: the computation follows the inputs' shardings
        return generate_padded.lower(cfg, *args, max_new_tokens=int(new_tokens),
                                     adapter="generator").compile()

    compiled, secs = _timed_compile(lower)
    bad = sharding_mismatches(param_sh, compiled.input_shardings[0][0], params, "params")
    return Compiled(compiled, mesh, secs, bad)


def compile_encode(config: ml_collections.ConfigDict, mesh, batch: int) -> Compiled:
    """The index build's compressor call (`LatentEncoder`'s jitted `compress`) on a corpus
    batch of `batch` documents of data.doc_max_len tokens, rounded up to data x fsdp."""
    cfg = ModelConfig.from_config(config)
    b = round_to_mesh(batch, mesh)
    params, _ = _params_in(cfg, mesh)
    fn, param_sh, tok_sh = encode_fn(cfg, mesh)
    tokens = jax.ShapeDtypeStruct((b, int(config.data.doc_max_len)), jnp.int32, sharding=tok_sh)
    mask = jax.ShapeDtypeStruct(tokens.shape, bool, sharding=tok_sh)

    def lower():
        return fn.lower(_with_sharding(params, param_sh), tokens, mask).compile()

    compiled, secs = _timed_compile(lower)
    bad = sharding_mismatches(param_sh, compiled.input_shardings[0][0], params, "params")
    return Compiled(compiled, mesh, secs, bad)


def param_bytes_per_chip(config: ml_collections.ConfigDict, mesh) -> int:
    """Bytes of params one chip holds under the logical rules (the base in
    `model.base_dtype`, the rest float32)."""
    cfg = ModelConfig.from_config(config)
    params, param_sh = _params_in(cfg, mesh)
    return sum(math.prod(s.shard_shape(p.shape)) * p.dtype.itemsize
               for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_sh)))
