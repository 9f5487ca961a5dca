"""Throughput and FLOP utilisation of one training step.

    .venv/bin/python bench/train_step.py [--config configs/demo.py] [--stage 1] [--steps 10]
        [--set train.batch_size=32 ...]

Compiles the stage's step (the same `make_train_step` + `compile_train_step` as `clara
train`) on all local devices, feeds full-length random-token batches of the contract's shapes
(every position valid, so tokens/s counts real work), and times `--steps` steps after two
warm-up steps. In the same process, interleaved with the steps, it times a dense float32
2048 x 2048 matmul (the machine's practical matmul peak) and reports the model's useful FLOPs
per second as a fraction of it (medians of both). A config computing in bfloat16 is also rated
against a bfloat16 matmul (`flops_utilization_compute_dtype`).

The stage is trained as the demo (projects/demo) trains it: stages 1-2 also train the base
decoder when the config has a demo section with `demo.train_base` set (configs/demo.py),
unless `--set train.train_base=...` says otherwise.

model_flops_per_step counts the matmuls the method needs, analytically:
  forward: 2 x tokens x (dense weights used, LoRA factors included) + 4 x B x S^2 x N x H per
  layer of every decoder pass (attention scores and values over the full S x S square, as the
  implementation computes them);
  backward: a frozen base weight needs only the input gradient (1x forward), a trained one
  also its weight gradient (2x forward); attention needs 2x forward, trainable LoRA factors
  2x forward; stage 3's candidate encoding runs forward only (frozen compressor).
  Rematerialisation is not counted (it is not useful work).
XLA's own count for the compiled step is reported as xla_flops_per_step.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clara_jax.config import load_config_file  # noqa: E402
from clara_jax.model import ModelConfig, init_params  # noqa: E402
from clara_jax.model.sharding import make_mesh  # noqa: E402
from clara_jax.train.optimizer import trainable_groups  # noqa: E402
from clara_jax.train.state import (  # noqa: E402
    create_state,
    init_query_adapter,
    state_shardings,
)
from clara_jax.train.steps import (  # noqa: E402
    batch_fields,
    compile_train_step,
    make_train_step,
    rng_for_step,
)


def load_config(path: str, overrides: list[str]):
    """A config file relative to the repository (or absolute), finalized, with overrides."""
    file, sep, arg = path.partition(":")
    return load_config_file(str(REPO / file) + sep + arg, overrides)


def random_batch(config, stage: int, seed: int = 0) -> dict:
    """Full-length contract batch of random tokens: every position valid; the slots where the
    contract puts them (after BOS, K x (M slots + separator)); the last quarter answer."""
    rng = np.random.default_rng(seed)
    fields = batch_fields(config, stage)
    v = config.model.vocab_size
    m = config.model.num_memory_tokens
    k = 1 if stage == 1 else config.data.num_docs
    out = {}
    for name, f in fields.items():
        if f.dtype == jnp.int32:
            out[name] = rng.integers(4, v, size=f.shape, dtype=np.int32)
        else:
            out[name] = np.ones(f.shape, bool)
    t = fields["tokens"].shape[1]
    slot = np.zeros(t, bool)
    for i in range(k):
        slot[1 + i * (m + 1): 1 + i * (m + 1) + m] = True
    out["slot_mask"] = np.broadcast_to(slot, fields["slot_mask"].shape).copy()
    loss = np.zeros(t, bool)
    loss[-(t // 4):] = True
    out["loss_mask"] = np.broadcast_to(loss, fields["loss_mask"].shape).copy()
    docs_per_row = k if stage in (1, 2) else config.data.num_candidates
    out["pos_index"] = rng.integers(0, docs_per_row,
                                    size=fields["pos_index"].shape).astype(np.int32)
    return out


def _decoder_flops(cfg: ModelConfig, b: int, s: int, logits: bool) -> tuple[float, float]:
    """(dense matmul FLOPs, attention FLOPs) of one forward decoder pass over b x s tokens
    with one LoRA adapter active."""
    d, n, g, h, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    shapes = {"q": (d, n * h), "k": (d, g * h), "v": (d, g * h), "o": (n * h, d),
              "gate": (d, f), "up": (d, f), "down": (f, d)}
    per_layer = sum(i * o for i, o in shapes.values())
    per_layer += sum(cfg.lora_rank * (i + o) for name, (i, o) in shapes.items()
                     if name in cfg.lora_targets)
    dense = 2.0 * b * s * per_layer * cfg.n_layers
    if logits:
        dense += 2.0 * b * s * d * cfg.vocab_size
    attn = 4.0 * b * s * s * n * h * cfg.n_layers
    return dense, attn


def model_flops_per_step(config, cfg: ModelConfig, stage: int, fields: dict) -> float:
    b = fields["tokens"].shape[0]
    t = fields["tokens"].shape[1]
    m = cfg.num_memory_tokens
    latent = 2.0 * cfg.dim * cfg.latent_width if cfg.projects_latents else 0.0
    # forward + backward: input gradients, and weight gradients when the base trains
    passes = 3 if "base" in trainable_groups(config, stage) else 2
    gen_dense, gen_attn = _decoder_flops(cfg, b, t, logits=True)
    gen_dense += latent * b * t  # latent_up over the slots (upper bound: all positions)
    total = passes * gen_dense + 3 * gen_attn
    if stage in (1, 2):
        kd, td = fields["doc_tokens"].shape[1:]
        dense, attn = _decoder_flops(cfg, b * kd, td + m, logits=False)
        total += passes * (dense + latent * b * kd * m) + 3 * attn
        if float(config.train.lambda_retrieval) > 0:  # the questions through the compressor
            tq = fields["query_tokens"].shape[1]
            dense, attn = _decoder_flops(cfg, b, tq + m, logits=False)
            total += passes * (dense + latent * b * m) + 3 * attn
    else:
        c, td = fields["cand_tokens"].shape[1:]
        dense, attn = _decoder_flops(cfg, b * c, td + m, logits=False)
        total += dense + latent * b * c * m + attn  # frozen compressor: forward only
        tq = fields["query_tokens"].shape[1]
        dense, attn = _decoder_flops(cfg, b, tq + m, logits=False)
        total += 2 * (dense + latent * b * m) + 3 * attn
    return float(total)


def _matmul(n: int = 2048, dtype=jnp.float32):
    """A jitted dense n x n matmul of `dtype` inputs (accumulated in float32, as the model's
    dense layers do) and its FLOPs."""
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    y = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    f(x, y).block_until_ready()
    return (lambda: f(x, y).block_until_ready()), 2.0 * n ** 3


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


class StepBench:
    """One stage's compiled train step on full-length random batches, ready to time: the same
    `make_train_step` + `compile_train_step` as `clara train`, the state on its shardings over
    the config's mesh. `run()` takes one step and waits for it; `state` and `metrics` are the
    latest step's."""

    def __init__(self, config, stage: int, seed: int = 0):
        self.config, self.stage = config, stage
        self.cfg = cfg = ModelConfig.from_config(config)
        mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        params = init_params(cfg, jax.random.key(seed))
        if stage == 3:
            params = init_query_adapter(params)
        state = create_state(config, params, stage)
        shardings = state_shardings(cfg, mesh, state)
        abstract = jax.eval_shape(lambda s: s, state)
        self.state = jax.device_put(jax.tree.map(np.asarray, state), shardings)
        del params, state
        self.fields = batch_fields(config, stage)
        t0 = time.perf_counter()
        self.step, batch_sh = compile_train_step(make_train_step(config, cfg, stage,
                                                                 abstract.params),
                                                 mesh, shardings, abstract, self.fields)
        self.compile_s = time.perf_counter() - t0
        cost = self.step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        # XLA counts a loop body once: with model.scan_layers this is about one layer's share.
        self.xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
        self.batch = jax.device_put(random_batch(config, stage, seed), batch_sh)
        self.tokens = float(sum(np.sum(np.asarray(self.batch[k])) for k in
                                ("mask", "doc_mask", "cand_mask", "query_mask")
                                if k in self.batch))
        self.model_flops = model_flops_per_step(config, cfg, stage, self.fields)
        self.metrics, self.i = None, 0

    def run(self) -> None:
        st, m = self.step(self.state, self.batch, rng_for_step(self.state.rng, self.i))
        jax.block_until_ready((st, m))
        self.state, self.metrics, self.i = st, m, self.i + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--stage", type=int, default=None, help="default: the config's train.stage")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides: train.batch_size=32")
    args = ap.parse_args()
    config = load_config(args.config, args.set)
    stage = config.train.stage if args.stage is None else args.stage
    config.train.stage = stage
    if not any(item.startswith("train.train_base=") for item in args.set):
        config.train.train_base = stage < 3 and "demo" in config and bool(config.demo.train_base)
    bench = StepBench(config, stage)
    cfg = bench.cfg
    for _ in range(2):
        bench.run()
    matmul, matmul_flops = _matmul()
    # A bfloat16 model is also rated against the bfloat16 matmul's peak (AMX on recent Xeons,
    # several times the float32 one): the float32 ratio alone would flatter it.
    low = cfg.compute_dtype != jnp.float32
    matmul_low, _ = _matmul(dtype=cfg.compute_dtype) if low else (None, None)
    # Steps and matmuls interleaved and summarised by their medians, so that load from other
    # processes on the machine affects both sides of the ratio alike.
    steps, mms, mms_low = [], [], []
    for _ in range(args.steps):
        steps.append(_timed(bench.run))
        mms.append(_timed(matmul))
        if low:
            mms_low.append(_timed(matmul_low))
    step_s = float(np.median([w for w, _ in steps]))
    step_cpu = float(np.median([c for _, c in steps]))
    mm_s = float(np.median([w for w, _ in mms]))
    mm_cpu = float(np.median([c for _, c in mms]))
    peak = matmul_flops / mm_s
    flops, tokens = bench.model_flops, bench.tokens
    out = {
        "config": args.config, "stage": stage, "train_base": bool(config.train.train_base),
        "overrides": args.set,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform,
        "batch_size": config.train.batch_size, "compile_s": bench.compile_s, "step_s": step_s,
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "model_flops_per_step": flops, "xla_flops_per_step": bench.xla_flops,
        "model_flops_per_s": flops / step_s, "matmul_peak_flops_per_s": peak,
        "flops_utilization": flops / step_s / peak,
        # The same ratio per CPU-second the process got (insensitive to other processes).
        "flops_utilization_cpu_time": (flops / step_cpu) / (matmul_flops / mm_cpu),
        "loss": float(bench.metrics["loss"]),
    }
    if low:
        peak_low = matmul_flops / float(np.median([w for w, _ in mms_low]))
        out.update({"compute_dtype": str(cfg.compute_dtype),
                    "matmul_peak_compute_dtype_flops_per_s": peak_low,
                    "flops_utilization_compute_dtype": flops / step_s / peak_low})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
