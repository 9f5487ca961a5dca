"""The training loop: mesh, state (fresh, from a previous stage, from Hugging Face weights, or
resumed), the ahead-of-time compiled step, progress, metrics, evaluation, checkpoints,
preemption and the non-finite policy. Side effects live here; the step functions stay pure.

Outputs under WORKDIR:
  checkpoints/<step>/   orbax: train state, data-iterator state, run metadata
  metrics.jsonl         one JSON object per logged step: step, stage, loss and its terms,
                        grad_norm, lr, tokens_per_s
  eval_metrics.jsonl    one JSON object per evaluation (train.eval_every)
  tb/                   TensorBoard event files (the same numbers)

Exact resume: the state holds the step and the run's base key, each step's dropout key is
`fold_in(base key, step)`, and the data iterator's state is saved with every checkpoint; on
restart the latest checkpoint is restored, metrics.jsonl is cut back to its step, and the
run continues with the same batches and keys, so it logs the same losses as an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax.config import ConfigError, check_batch_fits_mesh
from clara_jax.convert import bundle, hf
from clara_jax.model import ModelConfig, init_params, logical_specs
from clara_jax.model.sharding import DEFAULT_RULES, logical_to_shardings, make_mesh
from clara_jax.train import checkpoint as ckpt
from clara_jax.train.state import (
    TrainState,
    abstract_state,
    create_state,
    init_query_adapter,
    state_shardings,
)
from clara_jax.train.steps import compile_train_step, make_eval_step, make_train_step
from clara_jax.workdir import lock as workdir_lock

# (config, stage, split) -> an iterator of contract batches with get_state()/set_state().
LoaderFactory = Callable[[ml_collections.ConfigDict, int, str], Iterator[dict]]


class NonFiniteLossError(RuntimeError):
    """A step's loss or gradient was not finite and train.nan_policy is 'stop'."""


@dataclasses.dataclass
class RunResult:
    status: str  # 'done' or 'preempted'
    step: int
    last_metrics: dict
    checkpoint: str | None


def _is_main() -> bool:
    return jax.process_index() == 0


def _say(msg: str) -> None:
    if _is_main():
        print(msg, flush=True)


def make_mesh_from_config(config: ml_collections.ConfigDict, devices=None):
    """config.mesh over `devices` (default: all of them; `clara compile --topology` passes a
    TPU topology's compile-only devices). ConfigError when it does not fit them or the batch
    does not split over its batch axes."""
    try:
        mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    except ValueError as e:  # the config's mesh does not fit this host's devices
        raise ConfigError(f"config.mesh: {e}") from None
    check_batch_fits_mesh(config, int(mesh.shape["data"]) * int(mesh.shape["fsdp"]))
    return mesh


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings`."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _hf_params(config, path: str, cfg: ModelConfig, shardings):
    """Params from Hugging Face weights: a checkpoint directory (config.json + safetensors,
    converted on the fly) or a `clara convert from-hf` directory (model_config.json +
    params/). The architecture must be the config's (the error names every field to set);
    the params come back float32 (master weights) on `shardings`."""
    overrides = {f: getattr(cfg, f) for f in hf.OVERRIDABLE}
    is_bundle = (Path(path) / bundle.MODEL_CONFIG_FILE).exists()
    if is_bundle:
        theirs = bundle.read_model_config(path)
    else:
        theirs = hf.model_config_from_hf(hf.read_hf_config(path), **overrides)
        if theirs.vocab_size < cfg.vocab_size:  # load() grows the embedding to the config's
            theirs = dataclasses.replace(theirs, vocab_size=cfg.vocab_size)
    keep = () if is_bundle else hf.OVERRIDABLE
    diff = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in keep and getattr(theirs, f.name) != getattr(cfg, f.name)]
    if diff:
        fixes = " ".join(f"--config.model.{f}={getattr(theirs, f)!r}" for f in diff)
        raise ValueError(f"--init_from_hf={path}: the checkpoint's architecture differs from "
                         f"the config in {diff}; set {fixes}")
    if is_bundle:
        _, params = bundle.load_params(path, cfg, shardings=shardings)
    else:
        loaded_cfg, params = hf.load(path, min_vocab_size=cfg.vocab_size,
                                     seed=config.train.seed, shardings=shardings, **overrides)
        if loaded_cfg != cfg:
            raise ValueError(f"--init_from_hf={path}: converted config {loaded_cfg} differs "
                             f"from the run's {cfg} (a grown vocabulary is rounded up to a "
                             "multiple of 64: set --config.model.vocab_size to that)")
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype("float32"), p),
                   out_shardings=shardings)(params)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the records of steps <= last_step (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        if line.strip() and json.loads(line).get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


class _Preemption:
    """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop saves and exits cleanly at the next
    step boundary. A second Ctrl-C interrupts at once (no save)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # the name of the signal received
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if _is_main():
            print(f"{self.requested}: saving a checkpoint at the end of this step (Ctrl-C "
                  "again to stop without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def _global_batch(batch: dict, shardings: dict) -> dict:
    """This process's rows -> global jax arrays sharded on the batch axis."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in batch.items()}


def _fields(batch: dict) -> dict:
    n = jax.process_count()
    return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * n,) + np.shape(v)[1:], np.asarray(v).dtype)
            for k, v in batch.items()}


def _initial_state(config, cfg, stage, mesh, abstract, shardings, init_from, init_from_hf):
    param_sh = logical_to_shardings(logical_specs(cfg), mesh)
    from_stage3 = False
    if init_from:
        def target(src_meta):
            ckpt.check_model(src_meta, config, f"--init_from={init_from}")
            src_config = config.copy_and_resolve_references()
            src_config.train.train_base = bool(src_meta.get("train_base", False))
            a = abstract_state(src_config, cfg, int(src_meta["stage"]))
            return a, state_shardings(cfg, mesh, a)
        params, meta = ckpt.restore_params(init_from, target)
        from_stage3 = int(meta["stage"]) == 3
        _say(f"initialised from {init_from} (stage {meta['stage']}, step {meta['step']})")
    elif init_from_hf:
        params = _hf_params(config, init_from_hf, cfg, param_sh)
        _say(f"initialised from Hugging Face weights in {init_from_hf}")
    else:
        params = jax.jit(lambda key: init_params(cfg, key), out_shardings=param_sh)(
            jax.random.key(config.train.seed))
    if stage == 3 and not from_stage3:
        params = jax.jit(init_query_adapter, out_shardings=param_sh)(params)
    return jax.jit(lambda p: create_state(config, p, stage), out_shardings=shardings)(params)


def train(config: ml_collections.ConfigDict, workdir, loader_factory: LoaderFactory, *,
          init_from: str | None = None, init_from_hf: str | None = None,
          progress: bool = True, tokenizer_dir=None) -> RunResult:
    """Runs (or resumes) `train.stage` up to `train.steps`. Raises NonFiniteLossError when a
    step is not finite under nan_policy='stop'; returns status 'preempted' after SIGTERM
    (with a checkpoint saved). `tokenizer_dir`: the data's tokenizer, copied into
    WORKDIR/tokenizer (and a workdir holding another one is refused)."""
    t = config.train
    stage = int(t.stage)
    cfg = ModelConfig.from_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh_from_config(config)
    abstract = abstract_state(config, cfg, stage)
    shardings = state_shardings(cfg, mesh, abstract)
    # One writer per workdir (process 0 holds the lock for a multi-process run).
    with (workdir_lock(workdir, "clara train") if _is_main() else contextlib.nullcontext()):
        # A corrupt or partial newest step is reported, moved aside and the previous intact
        # step resumed from (before the manager lists the steps).
        ckpt.intact_step(ckpt.checkpoint_dir(workdir), move_bad_to=workdir / ckpt.CORRUPT_DIR)
        if tokenizer_dir is not None and _is_main():
            ckpt.pin_tokenizer(workdir, tokenizer_dir)
        loader = loader_factory(config, stage, "train")
        manager = ckpt.make_manager(workdir, keep=int(t.keep_checkpoints))
        meta = {"stage": stage, "train_base": bool(t.train_base), "config": config.to_json()}
        try:
            return _train(config, workdir, loader_factory, init_from, init_from_hf, progress,
                          cfg, mesh, abstract, shardings, manager, loader, meta)
        finally:
            manager.close()


def _train(config, workdir, loader_factory, init_from, init_from_hf, progress, cfg, mesh,
           abstract, shardings, manager, loader, meta) -> RunResult:
    t = config.train
    stage = int(t.stage)
    metrics_path = workdir / "metrics.jsonl"
    latest = manager.latest_step()
    if latest is not None:
        saved_meta = ckpt.read_meta(manager, latest)
        ckpt.check_model(saved_meta, config, str(ckpt.checkpoint_dir(workdir)))
        for key in ("stage", "train_base"):
            if saved_meta.get(key, meta[key]) != meta[key]:
                raise ckpt.CheckpointError(
                    f"{ckpt.checkpoint_dir(workdir)} holds a run with {key}="
                    f"{saved_meta[key]}; this config has train.{key}={meta[key]} (use a new "
                    "--workdir, and --init_from to start from that run)")
        state, data_state, _ = ckpt.restore(manager, abstract, shardings, latest)
        if data_state:
            loader.set_state(data_state)
        _truncate_jsonl(metrics_path, latest)
        _truncate_jsonl(workdir / "eval_metrics.jsonl", latest)
        _say(f"resumed from {ckpt.checkpoint_dir(workdir)}/{latest}")
    else:
        if init_from and init_from_hf:
            raise ValueError("give at most one of --init_from and --init_from_hf")
        state = _initial_state(config, cfg, stage, mesh, abstract, shardings, init_from,
                               init_from_hf)
        _truncate_jsonl(metrics_path, 0)

    start = int(jax.device_get(state.step))
    if start >= t.steps:
        _say(f"nothing to do: step {start} >= train.steps={t.steps}")
        return RunResult("done", start, {}, str(ckpt.checkpoint_dir(workdir)))

    first = next(loader)
    fields = _fields(first)
    step_fn = make_train_step(config, cfg, stage, abstract.params)
    t0 = time.perf_counter()
    compiled, batch_sh = compile_train_step(step_fn, mesh, shardings, abstract, fields)
    mem = compiled.memory_analysis()
    _say(f"compiled stage-{stage} step in {time.perf_counter() - t0:.1f}s on mesh "
         f"{dict(mesh.shape)}; per device: params "
         f"{per_device_bytes(abstract.params, shardings.params) / 2**20:.2f} MiB, optimizer "
         f"{per_device_bytes(abstract.opt_state, shardings.opt_state) / 2**20:.2f} MiB"
         + ("" if mem is None else
            f"; compiled: arguments {mem.argument_size_in_bytes / 2**20:.2f} MiB, outputs "
            f"{mem.output_size_in_bytes / 2**20:.2f} MiB, aliased "
            f"{mem.alias_size_in_bytes / 2**20:.2f} MiB, temporaries "
            f"{mem.temp_size_in_bytes / 2**20:.2f} MiB"))

    fold = jax.jit(lambda key, s: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(key), s)))
    eval_fn = None
    writer = None
    if _is_main():
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(workdir / "tb"))
    bar = None
    # A bar only on a terminal; a log file gets one plain line per train.log_every instead.
    plain = progress and not (sys.stdout.isatty() and sys.stderr.isatty())
    if progress and not plain and _is_main():
        from tqdm import tqdm
        bar = tqdm(total=int(t.steps), initial=start, desc=f"stage {stage}", unit="step",
                   dynamic_ncols=True)

    step = start
    pending: list[dict] = []
    last: dict = {}
    window_start = time.perf_counter()
    status = "done"
    batch = first
    try:
        with _Preemption() as preempt:
            while step < t.steps:
                if batch is None:
                    batch = next(loader)
                with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
                    state, metrics = compiled(state, _global_batch(batch, batch_sh),
                                              fold(state.rng, step))
                batch = None
                step += 1
                pending.append(metrics)
                log_now = step % t.log_every == 0 or step == t.steps
                save_now = step % t.checkpoint_every == 0 or step == t.steps
                if log_now or save_now or preempt.requested:
                    host = jax.device_get(pending)
                    pending = []
                    bad = [start_i for start_i, m in enumerate(host) if m["nonfinite"]]
                    if bad:
                        first_bad = step - len(host) + bad[0] + 1
                        where = manager.latest_step()
                        msg = (f"non-finite loss or gradient at step {first_bad} ({len(bad)} "
                               f"step(s) since the last check; those updates were skipped); "
                               f"last good checkpoint: "
                               + (f"{ckpt.checkpoint_dir(workdir)}/{where}"
                                  if where is not None else "none"))
                        if t.nan_policy == "stop":
                            raise NonFiniteLossError(msg)
                        _say("warning: " + msg)
                    now = time.perf_counter()
                    tokens = sum(m["tokens"] for m in host)
                    rate = float(tokens) / max(now - window_start, 1e-9)
                    window_start = now
                    last = {k: float(v) for k, v in host[-1].items()}
                    if log_now and _is_main():
                        record = {"step": step, "stage": stage, **last, "tokens_per_s": rate}
                        # Strict JSON: a non-finite value (a skipped step's loss) is null.
                        record = {k: v if math.isfinite(v) else None
                                  for k, v in record.items()}
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        for k, v in record.items():
                            if k not in ("step", "stage") and v is not None:
                                writer.add_scalar(f"train/{k}", v, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{rate:,.0f}")
                    elif plain and log_now:
                        _say(f"stage {stage} step {step}/{t.steps}: loss {last['loss']:.4f}, "
                             f"{rate:,.0f} tokens/s")
                    ckpt.seal(manager)  # the previous save's manifest, once orbax is done
                if bar is not None:
                    bar.update(1)
                if t.eval_every and step % t.eval_every == 0:
                    if eval_fn is None:
                        eval_fn = jax.jit(make_eval_step(config, cfg, stage),
                                          in_shardings=(shardings.params, batch_sh),
                                          out_shardings=NamedSharding(mesh, PartitionSpec()))
                    _evaluate(config, stage, step, state, eval_fn, loader_factory, batch_sh,
                              mesh, workdir, writer)
                if save_now or preempt.requested:
                    ckpt.save(manager, state, loader.get_state(), {**meta, "step": step})
                if preempt.requested:
                    status = "preempted"
                    _say(f"{preempt.requested}: saved step {step} to "
                         f"{ckpt.checkpoint_dir(workdir)}; exiting")
                    break
    finally:
        ckpt.finish(manager)
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return RunResult(status, step, last, str(ckpt.checkpoint_dir(workdir)))


def _evaluate(config, stage, step, state: TrainState, eval_fn, loader_factory, batch_sh, mesh,
              workdir: Path, writer) -> dict:
    """Mean metrics over train.eval_batches batches of the eval split (a fresh, seeded
    iterator each time, so every evaluation sees the same batches)."""
    loader = loader_factory(config, stage, str(config.train.eval_split))
    sums: dict[str, float] = {}
    n = 0
    for _ in range(int(config.train.eval_batches)):
        try:
            batch = next(loader)
        except StopIteration:
            break
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            m = jax.device_get(eval_fn(state.params, _global_batch(batch, batch_sh)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    out = {k: v / max(n, 1) for k, v in sums.items()}
    if _is_main() and n:
        record = {"step": step, "stage": stage, "split": str(config.train.eval_split),
                  "batches": n, **out}
        with open(workdir / "eval_metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in out.items():
            writer.add_scalar(f"eval/{k}", v, step)
        print(f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in out.items()),
              flush=True)
    return out


