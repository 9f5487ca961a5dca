"""Pretraining on a stream of freshly generated worlds: the starting point of the bundled demo.

CLaRa adapts a pretrained LLM. The demo's decoder is small and has no pretrained weights; trained
from scratch on one fixed world it learns that world by heart instead of reading its latents
(projects/demo/README.md). Here the whole model (base decoder, compressor and generator
adapters, memory tokens, latent projections) trains on stage-1 and stage-2 examples of worlds
generated on the fly, one after another (seeds FIRST_SEED, FIRST_SEED + 1, ...; neither the
demo's train nor its held-out world is among them). A fact is seen in one world only, so
only reading the document's latents lowers the answer loss, and the model cannot memorise.

Worker processes generate and featurize the worlds (`clara_jax.data.featurize`, the batch
contract of the TFDS pipeline) while the accelerator trains; steps alternate between a stage-1
batch (one document's latents -> QA answer or paraphrase) and a stage-2 batch (question + K
documents' latents, the gold one among them -> answer), with the stage's usual loss
(`clara_jax.train.steps.make_loss_fn`). The run stops after `seconds` of training and writes:

  OUT/params.safetensors   the full parameter tree, "/"-joined paths (rewritten atomically at
                           every evaluation, so a run stopped early still leaves its last one)
  OUT/tokenizer/           the tokenizer it was trained with (the demo must use the same)
  OUT/pretrain.json        settings, steps, worlds, examples, wall time, device, eval curve

Every evaluation scores fixed examples of an evaluation world (EVAL_SEED, never trained on):
answer CE and teacher-forced exact answers with the right document's latents against those of
another example's, for stage 1 (one document) and stage 2 (K documents).

    python -m projects.demo.run_pretrain --config=configs/demo.py --tokenizer=DIR --out=DIR \
        --seconds=420 \
        [--batch_size=128] [--workers=12] [--init_params=FILE --first_seed=2000]

It runs in one process, on the config's mesh over that process's devices.

Measured (projects/demo/start/pretrain.json): the demo model at batch 128 on one H200
ran about 25 steps/s after an 85 s compilation, with 13 workers keeping up (a medium world,
11,440 stage-1 and 4,096 stage-2 examples, takes a worker about 4.4 s). On a 2-core CPU a
step pair at batch 16 takes about 2.3 s.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import queue
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax import losses, param_store
from clara_jax.data import world
from clara_jax.data.featurize import Featurizer
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.fileio import atomic_write_json
from clara_jax.model import (
    OPTIONAL_PARAMS,
    ModelConfig,
    abstract_params,
    compress_docs,
    fit_optional_params,
    generate_logits,
)
from clara_jax.model import init_params as init_params_of

FIRST_SEED = 1000
EVAL_SEED = 999
EVAL_EXAMPLES = 256
PARAMS_FILE = "params.safetensors"
TOKENIZER_DIR = "tokenizer"
PARAPHRASE_QUESTION_KEY = "paraphrase"
SYNC_EVERY = 16  # step pairs between waits for the device
STAGE2_PER_WORLD = 4096  # a medium world has ~14k stage-2 rows; its stage-1 rows are all kept

_FEATURIZERS: dict[int, Featurizer] = {}


def _init_worker(tokenizer_dir: str, fields: dict[int, dict]) -> None:
    tok = load_tokenizer(tokenizer_dir)
    for stage, f in fields.items():
        _FEATURIZERS[stage] = Featurizer(tok=tok, **f)


def featurizer_fields(tok, config, stage: int) -> dict:
    """The Featurizer's settings for `stage` without its tokenizer (picklable)."""
    f = Featurizer.from_config(tok, config, stage)
    return {k.name: getattr(f, k.name) for k in dataclasses.fields(f) if k.name != "tok"}


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    # Token ids fit int16 for vocabularies below 32k: half the bytes between processes.
    return {k: v.astype(np.int16) if v.dtype == np.int32 and k != "pos_index" else v
            for k, v in out.items()}


def stage_examples(w: world.World, stage: int, limit: int | None = None,
                   seed: int = 0) -> list[dict]:
    """The stored-example dicts of `w` for stage 1 (every QA pair and paraphrase) or 2, in
    the form the TFDS sources give them; stage 2 a random `limit` of them."""
    rows = world.world_rows(w)
    if stage == 1:
        out = []
        for line, row in enumerate(rows["stage1.jsonl"]):
            doc = row["docs"][0]
            if row["data_type"] == "paraphrase":
                out.append({"data_type": "paraphrase", "question": "", "doc": doc,
                            "answer": row["answers"][0], "line": line})
                continue
            out += [{"data_type": "qa", "question": q, "answer": a, "doc": doc, "line": line}
                    for q, a in zip(row["question"], row["answers"])]
        return out
    out = [dict(r, line=i) for i, r in enumerate(rows["stage2.jsonl"])]
    if limit is not None and len(out) > limit:
        pick = np.random.default_rng(seed).choice(len(out), limit, replace=False)
        out = [out[i] for i in sorted(pick)]
    return out


def world_batches(seed: int, size: str = "medium", focus: bool = False, qa_only: bool = False
                  ) -> tuple[int, dict[int, dict]]:
    """(seed, {stage: stacked arrays}) of a newly generated world (run in a worker); `focus`:
    stage 1's documents cut to their subject's sentences (`world.focused`), while stage 2 keeps
    whole documents, the format retrieval hands the generator; `qa_only`: no stage-1
    paraphrases."""
    whole = world.make_world(seed, size, "train")
    focused = world.focused(whole) if focus else whole
    out = {}
    for stage, feat in _FEATURIZERS.items():
        limit = STAGE2_PER_WORLD if stage == 2 else None
        exs = stage_examples(focused if stage == 1 else whole, stage, limit, seed)
        if qa_only:
            exs = [ex for ex in exs if ex.get("data_type", "qa") == "qa"]
        out[stage] = _stack([feat(ex) for ex in exs])
    return seed, out


# ----------------------------------------------------------------------------- parameters


def save_params(params: dict, path, metadata: dict | None = None) -> None:
    """Writes `params` as one safetensors file (`param_store` names), atomically."""
    param_store.save_safetensors(param_store.flatten(params), path, metadata)


def quantize_file(src, dst) -> dict:
    """Rewrites a `save_params` file with int8 rows (`param_store.quantize_int8`): a quarter of
    the bytes, for shipping a start in the repository; `load_params` reads either form.
    Returns {"bytes", "max_abs_error"}."""
    return param_store.save_safetensors(param_store.load_safetensors(src), dst, int8=True)


def load_params(path, cfg: ModelConfig) -> dict:
    """The tree `init_params(cfg)` has, filled from a `save_params` file; every leaf must be
    there with its shape, or a ValueError names the first that is not, except the optional
    ones (`OPTIONAL_PARAMS`: span head, chunk write, copy path), drawn fresh when the file has
    none, so that a start made without an option begins a run with it."""
    flat = widen_latents(param_store.load_safetensors(path), cfg)
    like = {k: v for k, v in abstract_params(cfg).items() if k not in OPTIONAL_PARAMS or k in flat}
    return fit_optional_params(cfg, param_store.unflatten_like(flat, like, path), seed=0)


def widen_latents(flat: dict, cfg: ModelConfig, seed: int = 0) -> dict:
    """A flat params dict made with latents narrower than cfg's (latent_down kernel [D, L0],
    L0 < L) widened to L, the function unchanged: the new latent dimensions are written zero
    (latent_down's new columns and bias), so the latent_up rows that read them (drawn like
    lecun_normal) add nothing until training moves them; span head and chunk-write slices of
    the new dimensions are zero. Lets a start made at L0 continue at a wider L (the 16x
    channel needed L = 192 where the start has 64, projects/demo/README.md)."""
    kernel = flat.get("latent_down/kernel")
    width = cfg.latent_width
    if kernel is None or kernel.shape[1] >= width:
        return flat
    old = kernel.shape[1]
    out = dict(flat)

    def pad(name, axis):
        if name in out:
            a = out[name]
            shape = list(a.shape)
            shape[axis] = width - old
            out[name] = np.concatenate([a, np.zeros(shape, a.dtype)], axis=axis)

    pad("latent_down/kernel", 1)
    pad("latent_down/bias", 0)
    pad("span_head", 1)
    pad("chunk_write", 2)
    up = out["latent_up/kernel"]
    fresh = np.random.default_rng(seed).normal(size=(width - old, up.shape[1])) / np.sqrt(width)
    out["latent_up/kernel"] = np.concatenate([up, fresh.astype(up.dtype)], axis=0)
    return out


def find_pretrained(path) -> Path:
    """The pretrained directory `path`: as given (absolute, or relative to the current
    directory), else relative to the repository that holds this package. It must hold
    PARAMS_FILE and TOKENIZER_DIR/."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[2] / path
    for need in (PARAMS_FILE, TOKENIZER_DIR):
        if not (path / need).exists():
            raise FileNotFoundError(f"{path}: not a pretrained model directory (no {need}; "
                                    f"python -m projects.demo.pretrain writes one)")
    return path


def write_start_state(config, pretrained, out) -> dict:
    """Saves the pretrained params as a stage-1 train state at step 0 in `out` (what
    `clara train --init_from=OUT` starts from), once; returns {"pretrained", "params"}."""
    # Lazy, like the imports in pretrain(): every spawned world worker imports this module,
    # and none of them needs orbax (train.checkpoint, through warmup).
    from projects.demo.warmup import save_start_state

    out = Path(out)
    done = out / "pretrained.json"
    if done.exists():
        return json.loads(done.read_text())
    src = find_pretrained(pretrained)
    params = load_params(src / PARAMS_FILE, ModelConfig.from_config(config))
    save_start_state(config, params, out, {"pretrained": str(src)})
    info = {"pretrained": str(src),
            "params": int(sum(np.size(x) for x in jax.tree.leaves(params)))}
    atomic_write_json(done, info)
    return info


# ----------------------------------------------------------------------------- evaluation


def make_eval_fn(cfg: ModelConfig):
    """fn(params, batch) -> {ce_right, ce_other, exact_right, exact_other}: answer CE (mean over
    target tokens) and the fraction of rows whose teacher-forced argmax gives every target
    token, with the row's own documents' latents and with the next row's."""

    def score(params, batch, latents):
        logits, _ = generate_logits(cfg, params, batch["tokens"], batch["mask"],
                                    batch["slot_mask"], latents)
        ce, _ = losses.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        right = (jnp.argmax(logits, -1) == batch["targets"]) | ~batch["loss_mask"]
        return ce, jnp.mean(jnp.all(right, axis=-1))

    @jax.jit
    def fn(params, batch):
        latents = compress_docs(cfg, params, batch["doc_tokens"], batch["doc_mask"])
        ce_r, ex_r = score(params, batch, latents)
        ce_o, ex_o = score(params, batch, jnp.roll(latents, 1, axis=0))
        return {"ce_right": ce_r, "ce_other": ce_o, "exact_right": ex_r, "exact_other": ex_o}

    return fn


def eval_batches(tok, fields: dict[int, dict], batch_size: int, n: int = EVAL_EXAMPLES
                 ) -> dict[int, list[dict]]:
    """Fixed evaluation batches per stage from the evaluation world: stage 1 its QA pairs only
    (paraphrases name the subject first, which any latents of the document give away)."""
    return qa_batches(tok, fields, world.make_world(EVAL_SEED, "small", "train"), batch_size, n)


def qa_batches(tok, fields: dict[int, dict], w: world.World, batch_size: int,
               n: int | None = None) -> dict[int, list[dict]]:
    """Full batches per stage of world `w`'s QA examples (no stage-1 paraphrases): a fixed
    random `n` of them (seed 0), or all in the world's order."""
    out = {}
    for stage, f in fields.items():
        feat = Featurizer(tok=tok, **f)
        exs = [e for e in stage_examples(w, stage) if e.get("data_type", "qa") == "qa"]
        if n is not None:
            exs = [exs[i] for i in np.random.default_rng(0).permutation(len(exs))[:n]]
        arrays = _stack([feat(e) for e in exs])
        out[stage] = [{k: jnp.asarray(v[i:i + batch_size]) for k, v in arrays.items()}
                      for i in range(0, len(exs) - batch_size + 1, batch_size)]
    return out


def evaluate(eval_fn, params, batches: dict[int, list[dict]]) -> dict:
    out = {}
    for stage, bs in batches.items():
        ms = [jax.device_get(eval_fn(params, b)) for b in bs]
        for k in ms[0]:
            out[f"stage{stage}_{k}"] = round(float(np.mean([m[k] for m in ms])), 4)
    return out


# ----------------------------------------------------------------------------- the run


def pretrain_config(config, batch_size: int, learning_rate: float, lambda_retrieval: float,
                    warmup_steps: int):
    """`config` set up for pretraining: every group trains (base included), a constant
    learning rate after `warmup_steps` of linear warm-up (the run stops on time, not steps);
    stage-2 rows all read latents (data.text_share = 0: this stream trains the channel through
    the latents, and its T stays that of latent rows)."""
    import copy

    c = copy.deepcopy(config)
    c.data.text_share = 0.0
    t = c.train
    t.batch_size, t.learning_rate = batch_size, learning_rate
    t.lambda_retrieval, t.train_base, t.stage = lambda_retrieval, True, 1
    t.schedule, t.steps, t.warmup_frac = "constant", 100 * warmup_steps, 0.01
    t.grad_accum = 1
    return c


class WorldStream:
    """The pretraining batches: worker processes generate and featurize worlds (seeds
    `first_seed`, `first_seed + 1`, ...; `world_batches`) ahead of the trainer; iterating gives
    (stage, batch of numpy arrays) with the stages taking turns, each batch `batch_size` rows
    of the current world drawn without replacement. When a world is used up the next one is
    taken if it is ready, else the current one is reshuffled and used again. Counts the
    worlds used, the batches per stage and the seconds spent waiting for a world."""

    def __init__(self, tokenizer_dir, fields: dict[int, dict], stages: tuple[int, ...],
                 batch_size: int, seed: int, workers: int, first_seed: int, size: str,
                 focus: bool, qa_only: bool):
        # Spawned, so that no worker inherits the threads JAX starts in this process.
        ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(workers, initializer=_init_worker,
                             initargs=(str(tokenizer_dir), fields))
        self.ready: queue.Queue = queue.Queue(maxsize=2 * workers)
        self.seeds = itertools.count(first_seed)
        self.world_args = (size, focus, qa_only)
        self.stages, self.batch_size = stages, batch_size
        self.rng = np.random.default_rng(seed)
        self.worlds: list[int] = []
        self.stage_steps = dict.fromkeys(stages, 0)
        self.waited_s = 0.0
        for _ in range(2 * workers):
            self._submit()

    def _submit(self) -> None:
        self.pool.apply_async(world_batches, (next(self.seeds), *self.world_args),
                              callback=self.ready.put, error_callback=self.ready.put)

    def _next_world(self, block: bool):
        t0 = time.perf_counter()
        try:
            got = self.ready.get(block=block, timeout=600 if block else None)
        except queue.Empty:
            return None
        finally:
            self.waited_s += time.perf_counter() - t0
        if isinstance(got, BaseException):
            raise got
        self._submit()
        return got

    def __iter__(self):
        current, orders, bs = None, {}, self.batch_size
        while True:
            if current is None or any(len(o) < bs for o in orders.values()):
                fresh = self._next_world(block=current is None)
                if fresh is not None:
                    seed, current = fresh
                    self.worlds.append(seed)
                orders = {s: self.rng.permutation(len(a["tokens"])) for s, a in current.items()}
            for s in self.stages:
                idx, orders[s] = orders[s][:bs], orders[s][bs:]
                self.stage_steps[s] += 1
                yield s, {k: v[idx].astype(np.int32) if v.dtype == np.int16 else v[idx]
                          for k, v in current[s].items()}

    def close(self) -> None:
        self.pool.terminate()


def _pretrain_hooks(stream: WorldStream, seconds: float, max_steps: int | None,
                    eval_every_s: float, eval_fn, evals, out: Path, log):
    """(stop rule, clock hook, evaluation hook) of a pretraining run: it stops, at the end of
    a turn of the stages, after `seconds` of training (the time in the steps, not waiting for
    worlds nor evaluating) or `max_steps`; it evaluates (and writes OUT/params.safetensors)
    every `eval_every_s` seconds of training and at the stop, keeping the records in
    `.curve`."""
    from clara_jax.train.loop import Hook

    turn = len(stream.stages)
    started = time.perf_counter()

    class Clock(Hook):
        def __init__(self):
            self.train_s = 0.0

        def before(self, step, state):
            self.t0, self.waited = time.perf_counter(), stream.waited_s

        def after(self, step, state, metrics, stop, fetched):
            self.train_s += time.perf_counter() - self.t0 - (stream.waited_s - self.waited)

    class Evals(Hook):
        def __init__(self):
            self.last_eval, self.curve = 0.0, []

        def after(self, step, state, metrics, stop, fetched):
            if step % turn or (clock.train_s - self.last_eval < eval_every_s and stop is None):
                return
            self.last_eval = clock.train_s
            record = {"step": step, "worlds": len(stream.worlds),
                      "examples": step * stream.batch_size, "train_s": round(clock.train_s, 1),
                      "wall_s": round(time.perf_counter() - started, 1),
                      "loss": round(float(metrics["loss"]), 4),
                      **evaluate(eval_fn, state.params, evals)}
            self.curve.append(record)
            log(json.dumps(record))
            save_params(state.params, out / PARAMS_FILE, {"step": step})

    def stop(step: int) -> str | None:
        if step % turn:
            return None
        if clock.train_s >= seconds:
            return "time"
        return "steps" if max_steps is not None and step >= max_steps else None

    clock = Clock()
    return stop, clock, Evals()


def _compiled_steps(c, cfg, stages, init_params, bow_weight: float = 0.0):
    """The pretraining state on the config's mesh (fresh, or from an `init_params` file, with
    a new optimizer state) and each stage's step compiled once with the state donated:
    (mesh, state, {stage: (compiled, batch shardings)}); `bow_weight` > 0 adds the
    bag-of-words loss (projects/demo/bag_of_words.py)."""
    from clara_jax.train.loop import make_mesh_from_config
    from clara_jax.train.state import abstract_state, create_state, state_shardings
    from clara_jax.train.steps import batch_fields, compile_train_step, make_train_step

    mesh = make_mesh_from_config(c)
    abstract = abstract_state(c, cfg, 1)
    shardings = state_shardings(cfg, mesh, abstract)
    if init_params is None:
        params = init_params_of(cfg, jax.random.key(int(c.train.seed)))
    else:
        params = load_params(init_params, cfg)
    state = jax.jit(lambda p: create_state(c, p, 1), out_shardings=shardings)(params)
    from projects.demo.bag_of_words import with_bag_of_words

    def step_of(s):
        loss_fn = with_bag_of_words(c, s, bow_weight) if bow_weight > 0 else None
        return make_train_step(c, cfg, s, abstract.params, loss_fn=loss_fn)

    steps = {s: compile_train_step(step_of(s), mesh, shardings, abstract, batch_fields(c, s))
             for s in stages}
    return mesh, state, steps


def pretrain(config, tokenizer_dir, out, seconds: float, batch_size: int = 128,
             learning_rate: float = 1e-3, lambda_retrieval: float = 0.25, workers: int = 8,
             eval_every_s: float = 60.0, warmup_steps: int = 200, size: str = "medium",
             first_seed: int = FIRST_SEED, init_params=None, max_steps: int | None = None,
             stages: tuple[int, ...] = (1, 2), focus: bool = False, qa_only: bool = False,
             bow_weight: float = 0.0, log=print) -> dict:
    """Trains for `seconds` (plus compile and evaluation time) and writes OUT (module
    docstring); `init_params`: a `save_params` file to continue from (with a new optimizer
    state; give it a `first_seed` past the worlds it saw); `max_steps`: stop there too, if
    sooner; `stages`: the stages whose steps take turns; `focus`, `qa_only`: see
    `world_batches` (the curriculum that opened the channel for hobbies,
    projects/demo/README.md); `bow_weight`: weight of the bag-of-words loss
    (projects/demo/bag_of_words.py; 0: none). Runs through the training loop
    (`clara_jax.train.loop.run`). Returns the summary written to OUT/pretrain.json."""
    # Here, not at the top: each spawned world worker imports this module to run
    # _init_worker, and the loop, train state and steps (orbax, optax) would only slow its
    # start.
    from clara_jax.train.loop import Loop, Reporter, global_batch, run

    if not stages or any(s not in (1, 2) for s in stages):
        raise ValueError(f"pretraining takes stages 1 and/or 2, got {stages!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = pretrain_config(config, batch_size, learning_rate, lambda_retrieval, warmup_steps)
    cfg = ModelConfig.from_config(c)
    tok = load_tokenizer(tokenizer_dir)
    if tok.vocab_size > cfg.vocab_size or tok.vocab_size >= 2 ** 15:
        raise ValueError(f"{tokenizer_dir}: vocabulary of {tok.vocab_size} does not fit "
                         f"model.vocab_size={cfg.vocab_size} (or int16 ids)")
    shutil.copytree(tokenizer_dir, out / TOKENIZER_DIR, dirs_exist_ok=True)
    fields = {s: featurizer_fields(tok, c, s) for s in stages}
    # The workers first, before JAX starts its threads.
    stream = WorldStream(tokenizer_dir, fields, stages, batch_size, int(c.train.seed), workers,
                         first_seed, size, focus, qa_only)
    try:
        mesh, state, steps = _compiled_steps(c, cfg, stages, init_params, bow_weight)
        evals = eval_batches(tok, fields, min(batch_size, 64))
        stop, clock, evals_hook = _pretrain_hooks(stream, seconds, max_steps, eval_every_s,
                                      make_eval_fn(cfg), evals, out, log)
        log(json.dumps({"event": "start", "devices": str(jax.devices()),
                        "batch_size": batch_size}))
        started = time.perf_counter()

        def step_fn(st, item, rng):
            compiled, batch_sh = steps[item[0]]
            return compiled(st, global_batch(item[1], batch_sh), rng)

        # Fetching the metrics (and checking them) every SYNC_EVERY turns also waits for the
        # device now and then, which keeps the time in the steps honest.
        every = SYNC_EVERY * len(stages)
        state, step, _, _ = run(state, 0, Loop(
            step_fn=step_fn, batches=iter(stream), stop=stop,
            report=Reporter(None, "pretrain", max_steps, every, progress=False),
            fetch=lambda i: i % every == 0, nan_policy=str(c.train.nan_policy),
            hooks=(clock, evals_hook),
            mesh=mesh))
    finally:
        stream.close()
    summary = {"steps": step, "stage_steps": stream.stage_steps,
               "examples": step * batch_size,
               "worlds": {"count": len(stream.worlds), "first_seed": first_seed,
                          "last_seed": max(stream.worlds), "size": size},
               "init_params": None if init_params is None else str(init_params),
               "eval_seed": EVAL_SEED, "batch_size": batch_size,
               "learning_rate": learning_rate, "lambda_retrieval": lambda_retrieval,
               "stages": list(stages), "focus": focus, "qa_only": qa_only,
               "bow_weight": float(bow_weight),
               "train_s": round(clock.train_s, 1),
               "wall_s": round(time.perf_counter() - started, 1),
               "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "curve": evals_hook.curve, "last": evals_hook.curve[-1] if evals_hook.curve
               else None}
    atomic_write_json(out / "pretrain.json", summary)
    return summary
