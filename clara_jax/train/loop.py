"""The training loop: mesh, state (fresh, from a previous stage, from Hugging Face weights, or
resumed), the ahead-of-time compiled step, progress, metrics, evaluation, checkpoints,
preemption and the non-finite policy. Side effects live here; the step functions stay pure.

Outputs under WORKDIR:
  checkpoints/<step>/   orbax: train state, data-iterator state, run metadata
  metrics.jsonl         one JSON object per logged step: step, stage, loss and its terms,
                        grad_norm, lr, tokens_per_s
  eval_metrics.jsonl    one JSON object per evaluation (train.eval_every)
  tb/                   TensorBoard event files (the same numbers); with train.profile_steps,
                        the profiler trace in tb/plugins/profile/<run>/<host>.xplane.pb
WORKDIR may be a URL (gs://bucket/run): every one of these goes to that filesystem
(`clara_jax.fileio.as_path`), the workdir lock becomes a lease (`clara_jax.workdir`), and the
JSONL files and event files, which object storage cannot append to, are rewritten whole now
and then (`_JsonlLog`, `_ObjectEventFile`).

Exact resume: the state holds the step and the run's base key, each step's dropout key is
`fold_in(base key, step)`, and the data iterator's state is saved with every checkpoint; on
restart the latest checkpoint is restored, metrics.jsonl is cut back to its step, and the
run continues with the same batches and keys, so it logs the same losses as an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter, record_writer
from tqdm import tqdm

from clara_jax.config import ConfigError, check_batch_fits_mesh
from clara_jax.convert import bundle, hf
from clara_jax.fileio import as_path, atomic_write_bytes, atomic_write_text, files_under, is_url
from clara_jax.model import ModelConfig, abstract_params, init_params, param_shardings
from clara_jax.model.api import INIT_COMPILER_OPTIONS
from clara_jax.model.sharding import DEFAULT_RULES, make_mesh
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


class Hook:
    """What a run does around its steps besides stepping (checkpoints, evaluation, profiling,
    collecting losses); `run` calls, for each step: `before(step, state)` (steps done so far),
    then the batch is drawn and the step dispatched inside `around(step + 1)`, then
    `after(step, state, metrics, stop, fetched)` with the new step count, its metrics (device
    arrays), why the run stops there (None: it goes on) and whether the metrics were just
    fetched and checked. `close(step)` once at the end, also on an error."""

    def before(self, step: int, state) -> None:
        pass

    def around(self, step: int):
        return contextlib.nullcontext()

    def after(self, step: int, state, metrics: dict, stop: str | None, fetched: bool) -> None:
        pass

    def close(self, step: int) -> None:
        pass


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
    the params come back on `shardings` in the dtypes of `abstract_params(cfg)` (float32
    master weights, the base in `model.base_dtype` whatever dtype it was stored in)."""
    overrides = {f: getattr(cfg, f) for f in hf.OVERRIDABLE}
    is_bundle = (Path(path) / bundle.MODEL_CONFIG_FILE).exists()
    if is_bundle:
        theirs = bundle.read_model_config(path)
    else:
        theirs = hf.model_config_from_hf(hf.read_hf_config(path), **overrides)
        if theirs.vocab_size < cfg.vocab_size:  # load() grows the embedding to the config's
            theirs = dataclasses.replace(theirs, vocab_size=cfg.vocab_size)
    # The storage dtype is not architecture: the params are cast to the run's below. A
    # bundle's latent layout is kept: a from-clara bundle's compressor was trained with it.
    keep = ("base_dtype",) if is_bundle else hf.OVERRIDABLE
    diff = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in keep and getattr(theirs, f.name) != getattr(cfg, f.name)]
    if diff:
        settings = (ModelConfig.config_setting(f, getattr(theirs, f)) for f in diff)
        fixes = " ".join(dict.fromkeys(f"--config.{x}" for x in settings if x))
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
    want = abstract_params(cfg)
    return jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, want),
                   out_shardings=shardings)(params)


def _kept_lines(path, last_step: int) -> tuple[list[str], bool]:
    """The records of steps <= last_step in the JSONL file (a resumed run rewrites the rest),
    and whether any were left out."""
    if not path.exists():
        return [], False
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    return kept, len(kept) < len(lines)


class _JsonlLog:
    """WORKDIR/metrics.jsonl or eval_metrics.jsonl, cut back to the steps <= `last_step` and
    then appended to (process 0 only).

    A local file is appended to line by line. Object storage cannot append, and rewriting the
    file at every logged step would upload the run's whole history each time; there the lines
    are kept here and the file is rewritten whole at most every FLUSH_S, and by `flush()`,
    which the loop calls before every checkpoint save and at the end. So the file always
    reaches at least the newest checkpoint's step, and what a crash loses is only what a
    resume cuts away and logs again."""

    FLUSH_S = 30.0

    def __init__(self, path, last_step: int):
        self.path = path
        self.remote = is_url(path)
        self.lines, self._dirty = _kept_lines(path, last_step)
        self.flush()
        if not self.remote:
            self.lines = []

    def append(self, record: dict) -> None:
        line = json.dumps(record)
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(line + "\n")
            return
        self.lines.append(line)
        self._dirty = True
        if time.monotonic() - self._flushed >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            atomic_write_text(self.path, "".join(x + "\n" for x in self.lines))
            self._dirty = False
        self._flushed = time.monotonic()


class _ObjectEventFile:
    """A TensorBoard event file on object storage, through epath (tensorboardX's own gs://
    and s3:// writers use the cloud SDKs directly, and know no other scheme). The store has no
    append, so each flush (tensorboardX's, every flush_secs, and at close) uploads the file
    whole, as tensorboardX's GCS writer does; past ROLL_BYTES the writer goes on in a new file
    (`NAME.1`, ...), which TensorBoard reads as part of the same run, so the uploads stay
    small."""

    ROLL_BYTES = 8 << 20

    def __init__(self, path: str):
        self.path, self.part, self.buffer = path, 0, bytearray()

    def _name(self) -> str:
        return self.path if self.part == 0 else f"{self.path}.{self.part}"

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        if self.part and not self.buffer:
            return  # nothing since the last part was finished
        atomic_write_bytes(self._name(), bytes(self.buffer))
        if len(self.buffer) > self.ROLL_BYTES:
            self.part, self.buffer = self.part + 1, bytearray()

    def close(self) -> None:
        self.flush()


class _ObjectEventFiles:
    """tensorboardX's writer factory interface for `_ObjectEventFile`."""

    def open(self, path: str) -> _ObjectEventFile:
        return _ObjectEventFile(path)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer(logdir):
    if is_url(logdir):  # for this scheme, event files go through epath (above)
        record_writer.register_writer_factory(os.fspath(logdir).split(":")[0],
                                              _ObjectEventFiles())
    return SummaryWriter(os.fspath(logdir))


class _Preemption:
    """SIGTERM or SIGINT (Ctrl-C) asks the loop to save and exit cleanly at a step boundary;
    `stop(step)` says whether to do that after `step`. A second Ctrl-C interrupts at once (no
    save).

    With several processes the decision must be the same on all of them, at the same step:
    each step and each save is a collective, so a process that stops alone leaves the others
    waiting in their next step for ever (and one that keeps going waits for the one that
    left). A scheduler may signal one process, or all of them moments apart. So:
      - with JAX's preemption service (started by jax.distributed.initialize), SIGTERM stays
        with its notifier, which tells the coordinator and through it every process;
        `stop(step)` is the service's sync point, True on every process at the same step.
        A Python SIGTERM handler would replace the notifier's and the news would stay in one
        process, so none is installed; Ctrl-C is passed on to the notifier as a SIGTERM.
      - without the service (jax_enable_preemption_service off), every process's flag is
        gathered at every step, which costs a host-device round trip per step but agrees.
      - one process: its own flag.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, start_step: int):
        self.requested = None  # the name of the signal this process received
        self._old = {}
        self._mode = "local"
        if jax.process_count() > 1:
            try:  # registers the starting step with the service; raises when there is none
                multihost_utils.reached_preemption_sync_point(start_step)
                self._mode = "service"
            except RuntimeError:
                self._mode = "gather"

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            handled = (signal.SIGINT,) if self._mode == "service" else self.SIGNALS
            self._old = {s: signal.signal(s, self._handle) for s in handled}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"{self.requested}: saving a checkpoint at the end of this step"
              + (" on every process" if self._mode != "local" else "")
              + " (Ctrl-C again to stop without saving)", file=sys.stderr, flush=True)
        if self._mode == "service":
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells every process

    def stop(self, step: int) -> bool:
        """Whether every process saves and exits after `step` (called by every process at
        every step, in step order)."""
        if self._mode == "service":
            return multihost_utils.reached_preemption_sync_point(step)
        if self._mode == "gather":
            flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
            return bool(np.max(flags))
        return self.requested is not None

    @property
    def reason(self) -> str:
        return self.requested or "preemption notice (a signal to one of the processes)"

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class _StepProfiler(Hook):
    """Traces train.profile_steps steps with the JAX profiler on process 0, starting after the
    run's first step (its one-time costs would swamp the trace), into WORKDIR/tb, where
    TensorBoard's profile tab reads it (tb/plugins/profile/<run>/<host>.xplane.pb). Steps are
    counted as completed steps: tracing covers steps first + 1 .. last."""

    def __init__(self, count: int, start: int, end: int, logdir):
        self.first = start + 1
        self.last = min(start + 1 + count, end)
        self.logdir = logdir
        # The profiler writes through its own C++ filesystem layer, which knows no fsspec
        # store and no emulated bucket: on a URL workdir the trace goes to a local directory
        # first and is uploaded file by file when it stops.
        self.local = None
        self.on = count > 0 and _is_main() and self.first < self.last
        self.tracing = False
        if count > 0 and not self.on:
            _say(f"train.profile_steps={count}: no step after this run's first to trace "
                 f"(steps {start + 1}..{end} left)")

    def before(self, step: int, state) -> None:
        if self.on and not self.tracing and step == self.first:
            jax.block_until_ready(state)  # the first step's work stays out of the trace
            if is_url(self.logdir):
                self.local = Path(tempfile.mkdtemp(prefix="clara_profile_"))
            jax.profiler.start_trace(str(self.local or self.logdir))
            self.tracing = True

    def around(self, step: int):
        """Marks one step for the trace viewer's step view (step = the step being run)."""
        if not self.tracing:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, state, metrics, stop, fetched) -> None:
        if self.tracing and step == self.last:
            self._stop(step, state)

    def close(self, step: int) -> None:
        self._stop(step)  # early, on preemption or an error

    def _stop(self, step: int, state=None) -> None:
        """Ends the trace (at the last traced step, or early on preemption or an error)."""
        if not self.tracing:
            return
        if state is not None:
            jax.block_until_ready(state)  # dispatched steps finish inside the trace
        jax.profiler.stop_trace()
        self.tracing = False
        if self.local is not None:
            for name in files_under(self.local):
                atomic_write_bytes(as_path(self.logdir) / name, (self.local / name).read_bytes())
            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None
        _say(f"profiler: traced steps {self.first + 1}-{step} into "
             f"{self.logdir / 'plugins' / 'profile'}")


def global_batch(batch: dict, shardings: dict) -> dict:
    """This process's rows -> global jax arrays sharded on the batch axis."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in batch.items()}


def _fields(batch: dict) -> dict:
    n = jax.process_count()
    return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * n,) + np.shape(v)[1:], np.asarray(v).dtype)
            for k, v in batch.items()}


def _initial_state(config, cfg, stage, mesh, abstract, shardings, init_from, init_from_hf):
    param_sh = param_shardings(cfg, mesh)
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
        params = jax.jit(lambda key: init_params(cfg, key), out_shardings=param_sh,
                         compiler_options=INIT_COMPILER_OPTIONS)(
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
    ckpt.check_storage(workdir)
    workdir = as_path(workdir)  # a URL stays a URL (see the module docstring)
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
            return _train(_Setup(config, workdir, loader_factory, cfg, mesh, abstract,
                                 shardings, manager, loader, meta),
                          init_from, init_from_hf, progress)
        finally:
            manager.close()


def _resume_or_init(s: _Setup, init_from, init_from_hf) -> tuple[TrainState, int | None]:
    """The latest checkpoint of the workdir (with the loader's position), else the initial
    state; returns (state, the step resumed from or None)."""
    latest = s.manager.latest_step()
    if latest is None:
        if init_from and init_from_hf:
            raise ValueError("give at most one of --init_from and --init_from_hf")
        return _initial_state(s.config, s.cfg, int(s.config.train.stage), s.mesh, s.abstract,
                              s.shardings, init_from, init_from_hf), None
    where = str(ckpt.checkpoint_dir(s.workdir))
    saved_meta = ckpt.read_meta(s.manager, latest)
    ckpt.check_model(saved_meta, s.config, where)
    for key in ("stage", "train_base"):
        if saved_meta.get(key, s.meta[key]) != s.meta[key]:
            raise ckpt.CheckpointError(
                f"{where} holds a run with {key}={saved_meta[key]}; this config has "
                f"train.{key}={s.meta[key]} (use a new --workdir, and --init_from to start "
                "from that run)")
    state, data_state, _ = ckpt.restore(s.manager, s.abstract, s.shardings, latest)
    if data_state:
        s.loader.set_state(data_state)
    _say(f"resumed from {where}/{latest}")
    return state, latest


def _compile_step(config, cfg, stage: int, mesh, abstract, shardings, first: dict):
    """The jitted train step for batches shaped like `first`, and the batch shardings; says
    what one device holds."""
    step_fn = make_train_step(config, cfg, stage, abstract.params)
    t0 = time.perf_counter()
    compiled, batch_sh = compile_train_step(step_fn, mesh, shardings, abstract, _fields(first))
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
    return compiled, batch_sh


class Reporter:
    """Where a run's step metrics go: metrics.jsonl, eval_metrics.jsonl and TensorBoard under
    `workdir` on process 0 (none without one), and a progress bar (on a terminal) or one plain
    line per `log_every` steps. `name` heads the bar and the lines; `stage` goes into each
    metrics record; `steps`: the run's last step, if known."""

    def __init__(self, workdir, name: str, steps: int | None, log_every: int, *,
                 stage=None, start: int = 0, latest: int | None = None,
                 progress: bool = True):
        self.name, self.stage, self.steps, self.log_every = name, stage, steps, int(log_every)
        self.logs = self.writer = self.bar = None
        if _is_main() and workdir is not None:
            # A resumed run logs the steps after its checkpoint again (a fresh one: from 1).
            self.logs = {name: _JsonlLog(workdir / f"{name}.jsonl", latest or 0)
                         for name in ("metrics", "eval_metrics")}
            self.writer = _summary_writer(workdir / "tb")
        self.plain = progress and not (sys.stdout.isatty() and sys.stderr.isatty())
        if progress and not self.plain and _is_main():
            self.bar = tqdm(total=steps, initial=start, desc=name, unit="step",
                            dynamic_ncols=True)
        self.window_start = time.perf_counter()

    def window(self, step: int, host: list[dict]) -> dict:
        """Reports the steps since the last window (their metrics fetched to the host), with a
        record when `step` is a multiple of log_every or the last; returns the last step's
        metrics as floats."""
        log_now = step % self.log_every == 0 or step == self.steps
        now = time.perf_counter()
        rate = float(sum(m["tokens"] for m in host)) / max(now - self.window_start, 1e-9)
        self.window_start = now
        last = {k: float(v) for k, v in host[-1].items()}
        if log_now and self.logs is not None:
            record = {"step": step, "stage": self.stage, **last, "tokens_per_s": rate}
            # Strict JSON: a non-finite value (a skipped step's loss) is null.
            record = {k: v if math.isfinite(v) else None for k, v in record.items()}
            self.logs["metrics"].append(record)
            for k, v in record.items():
                if k not in ("step", "stage") and v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{rate:,.0f}")
        elif self.plain and log_now:
            of = "" if self.steps is None else f"/{self.steps}"
            _say(f"{self.name} step {step}{of}: loss {last['loss']:.4f}, {rate:,.0f} tokens/s")
        return last

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        for log in (self.logs or {}).values():
            log.flush()

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _check_finite(host: list[dict], step: int, nan_policy: str,
                  last_good: Callable[[], str]) -> None:
    """Raises NonFiniteLossError (nan_policy 'stop') or warns ('skip') when a step of the
    window `host` ending at `step` had a non-finite loss or gradient; `last_good()` says where
    the last good checkpoint is."""
    bad = [i for i, m in enumerate(host) if m["nonfinite"]]
    if not bad:
        return
    first_bad = step - len(host) + bad[0] + 1
    msg = (f"non-finite loss or gradient at step {first_bad} ({len(bad)} step(s) since the "
           f"last check; those updates were skipped); last good checkpoint: {last_good()}")
    if nan_policy == "stop":
        raise NonFiniteLossError(msg)
    _say("warning: " + msg)


@dataclasses.dataclass
class Loop:
    """One training run's parts, for `run`.

    step_fn(state, batch, rng) -> (state, metrics): one update; `rng` is the step's key data
      (uint32[2], `fold_in(state.rng, step)`), metrics hold at least loss, tokens and
      nonfinite (`clara_jax.train.steps.make_train_step`'s).
    batches: the batch source, drawn once per step, just before it (so its position after
      step n is n batches on: what a checkpoint saves); endless.
    stop(step) -> None to go on after `step` steps, else why the run ends ('done',
      'preempted', 'time', ...); called once per step on every process.
    fetch(step): whether to bring the metrics since the last fetch to the host after `step`
      (the non-finite check and the report happen then; always at the stop).
    """

    step_fn: Callable
    batches: Iterator
    stop: Callable[[int], str | None]
    report: Reporter
    fetch: Callable[[int], bool]
    nan_policy: str = "stop"
    last_good: Callable[[], str] = lambda: "none"
    hooks: Sequence[Hook] = ()
    mesh: Mesh | None = None


def run(state, start: int, loop: Loop):
    """The one training loop: steps `state` from step `start` until `loop.stop` says why not,
    checking and reporting the metrics at each fetch; the hooks add what a run does besides
    (checkpoints, evaluation, profiling). Returns (state, step, last fetched metrics as floats,
    why it stopped). The hooks and the reporter are closed at the end, also on an error."""
    step, pending, last, why = start, [], {}, None
    try:
        while why is None:
            for h in loop.hooks:
                h.before(step, state)
            batch = next(loop.batches)
            with contextlib.ExitStack() as ctx:
                if loop.mesh is not None:
                    ctx.enter_context(jax.set_mesh(loop.mesh))
                    ctx.enter_context(nn.logical_axis_rules(DEFAULT_RULES))
                for h in loop.hooks:
                    ctx.enter_context(h.around(step + 1))
                state, metrics = loop.step_fn(state, batch, _fold(state.rng, step))
            step += 1
            why = loop.stop(step)  # the same on every process
            pending.append(metrics)
            fetched = why is not None or loop.fetch(step)
            if fetched:
                host, pending = jax.device_get(pending), []
                _check_finite(host, step, loop.nan_policy, loop.last_good)
                last = loop.report.window(step, host)
            loop.report.tick()
            for h in loop.hooks:
                h.after(step, state, metrics, why, fetched)
    finally:
        for h in loop.hooks:
            h.close(step)
        loop.report.close()
    return state, step, last, why


@jax.jit
def _fold(key, step):
    """The dropout key data of step `step` (steps.rng_for_step, jitted)."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), step))


@dataclasses.dataclass
class _Setup:
    """What `train` prepares before the loop: the run's config and model, the workdir and its
    checkpoint manager, the mesh and the state's layout, the train loader."""

    config: ml_collections.ConfigDict
    workdir: Path
    loader_factory: LoaderFactory
    cfg: ModelConfig
    mesh: Mesh
    abstract: TrainState
    shardings: TrainState
    manager: object
    loader: Iterator[dict]
    meta: dict


class _Checkpoints(Hook):
    """`train`'s hook: periodic evaluation (train.eval_every), checkpoints at
    train.checkpoint_every, at the last step and at a preemption, and each save's manifest
    once orbax has finished it."""

    def __init__(self, s: _Setup, report: Reporter, batch_sh: dict):
        self.s, self.report, self.batch_sh = s, report, batch_sh
        self.eval_fn = None

    def after(self, step, state, metrics, stop, fetched) -> None:
        s, t = self.s, self.s.config.train
        if fetched:
            ckpt.seal(s.manager)  # the previous save's manifest, once orbax is done
        if t.eval_every and step % t.eval_every == 0:
            if self.eval_fn is None:
                self.eval_fn = jax.jit(make_eval_step(s.config, s.cfg, int(t.stage)),
                                       in_shardings=(s.shardings.params, self.batch_sh),
                                       out_shardings=NamedSharding(s.mesh, PartitionSpec()))
            _evaluate(s.config, int(t.stage), step, state, self.eval_fn, s.loader_factory,
                      self.batch_sh, s.mesh, self.report.logs, self.report.writer)
        if step % t.checkpoint_every == 0 or step == t.steps or stop is not None:
            self.report.flush()  # the logs reach at least the saved step
            ckpt.save(s.manager, state, s.loader.get_state(), {**s.meta, "step": step})

    def close(self, step: int) -> None:
        ckpt.finish(self.s.manager)


def _last_good(s: _Setup) -> str:
    where = s.manager.latest_step()
    return f"{ckpt.checkpoint_dir(s.workdir)}/{where}" if where is not None else "none"


def _train(s: _Setup, init_from, init_from_hf, progress: bool) -> RunResult:
    t = s.config.train
    stage = int(t.stage)
    state, latest = _resume_or_init(s, init_from, init_from_hf)
    start = int(jax.device_get(state.step))
    if start >= t.steps:
        _say(f"nothing to do: step {start} >= train.steps={t.steps}")
        return RunResult("done", start, {}, str(ckpt.checkpoint_dir(s.workdir)))

    first = next(s.loader)
    compiled, batch_sh = _compile_step(s.config, s.cfg, stage, s.mesh, s.abstract, s.shardings,
                                       first)
    report = Reporter(s.workdir, f"stage {stage}", int(t.steps), int(t.log_every),
                       stage=stage, start=start, latest=latest, progress=progress)
    profiler = _StepProfiler(int(t.profile_steps), start, int(t.steps), s.workdir / "tb")
    with _Preemption(start) as preempt:
        def stop(step: int) -> str | None:
            if preempt.stop(step):
                return "preempted"
            return "done" if step >= t.steps else None

        loop = Loop(
            step_fn=lambda st, batch, rng: compiled(st, global_batch(batch, batch_sh), rng),
            batches=itertools.chain([first], s.loader), stop=stop, report=report,
            fetch=lambda step: step % t.log_every == 0 or step % t.checkpoint_every == 0,
            nan_policy=str(t.nan_policy), last_good=lambda: _last_good(s),
            hooks=(profiler, _Checkpoints(s, report, batch_sh)), mesh=s.mesh)
        state, step, last, why = run(state, start, loop)
        if why == "preempted":
            _say(f"{preempt.reason}: saved step {step} to "
                 f"{ckpt.checkpoint_dir(s.workdir)}; exiting")
    return RunResult(why, step, last, str(ckpt.checkpoint_dir(s.workdir)))


def _evaluate(config, stage, step, state: TrainState, eval_fn, loader_factory, batch_sh, mesh,
              logs: dict | None, writer) -> dict:
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
            m = jax.device_get(eval_fn(state.params, global_batch(batch, batch_sh)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    out = {k: v / max(n, 1) for k, v in sums.items()}
    if _is_main() and n:
        record = {"step": step, "stage": stage, "split": str(config.train.eval_split),
                  "batches": n, **out}
        logs["eval_metrics"].append(record)
        for k, v in out.items():
            writer.add_scalar(f"eval/{k}", v, step)
        print(f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in out.items()),
              flush=True)
    return out


