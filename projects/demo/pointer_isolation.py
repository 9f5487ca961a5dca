"""Can the copy path's pointer find the best source when nothing else moves?

The copy path (`model.latent_copy`) of a pretrained model, everything but the pointer and the
gate held: the generator's final states, the latents and the span read-outs of stage-1 QA
rows of a fresh world are computed once (`probe_answer_readout.generator_states`), then only
the pointer's params (`copy_query`, `copy_key`, `copy_subpos`) train on one of two losses and
the gate (`copy_gate`, `copy_gate_bias`) on the mixed answer CE with the copies held:

  soft: -log sum_s w_s p_s(target), train.pointer_weight's loss;
  hard: -log w_best, best = argmax_s p_s(target), the source a right pointer would pick.

With `model.copy_content` its content term (`copy_content_query`, `copy_content_key`, drawn
fresh when the params lack them) trains with the pointer.

`python -m projects.demo.pointer_isolation --config=configs/demo.py --params=P.safetensors
[--config.model.span_head=true ...] [--steps 400] [--loss soft|hard]` prints one JSON line:
the probe's `pointer_stats` on the evaluation world (seed 999, never trained on) before and
after, with the pointer's mass at the best source and the copy path's ceiling there.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from absl import app, flags

from clara_jax.commands.common import check_config_args, define_config_flag, load_config

POINTER_PARAMS = ("copy_query", "copy_key", "copy_subpos", "copy_content_query",
                  "copy_content_key", "copy_previous_key")
GATE_PARAMS = ("copy_gate", "copy_gate_bias")
TRAIN_SEED = 9500  # a world no pretraining run of projects/demo/README.md used


def frozen_inputs(cfg, params, batches) -> list[dict]:
    """What the pointer and the gate see, per stage-1 batch (held while they train): latents
    [B, 1, M, L], final states [B, T, D], positions int32[B, T], slot_mask, the generator's
    p(target) float32[B, T], each source's p_s(target) float32[B, S, T], loss_mask."""
    import jax
    import jax.numpy as jnp

    from clara_jax.model.clara import CLaRa
    from projects.demo.probe_answer_readout import generator_states, sources_at_targets

    @jax.jit
    def one(params, batch):
        latents, logits, hidden, positions = generator_states(cfg, params, batch)
        _, probs = CLaRa(cfg).apply({"params": params}, latents, positions, batch["slot_mask"],
                                    method=CLaRa.copy_memory)
        t = batch["targets"]
        own = jnp.take_along_axis(jax.nn.softmax(logits, -1), t[..., None], -1)[..., 0]
        return {"latents": latents, "hidden": hidden, "positions": positions,
                "slot_mask": batch["slot_mask"], "p_generator": own,
                "p_sources": sources_at_targets(probs, t),
                "loss_mask": batch["loss_mask"]}

    return [one(params, b) for b in batches]


def make_step(cfg, params, loss: str, learning_rate: float):
    """(init(trainable) -> opt state, step(trainable, opt, inputs) -> (trainable, opt, loss),
    measure(trainable, inputs) -> per-token arrays) over trainable = the pointer's and the
    gate's params."""
    import jax
    import jax.numpy as jnp
    import optax

    from clara_jax.model.clara import CLaRa

    model = CLaRa(cfg)
    opt = optax.adam(learning_rate)

    def forward(trainable, x):
        p = {"params": {**params, **trainable}}
        keys, _ = model.apply(p, x["latents"], x["positions"], x["slot_mask"],
                              method=CLaRa.copy_memory)
        weights, gate = model.apply(p, x["hidden"], x["positions"], keys,
                                    method=CLaRa.copy_pointer)
        copied = jnp.einsum("bts,bst->bt", weights, x["p_sources"])
        best = jnp.take_along_axis(weights, jnp.argmax(x["p_sources"], 1)[..., None], -1)[..., 0]
        return gate[..., 0], copied, best

    def loss_fn(trainable, x):
        g, copied, best = forward(trainable, x)
        pointer = -jnp.log((best if loss == "hard" else copied) + 1e-9)
        # The gate learns how far to trust copies it cannot change.
        mixed = -jnp.log((1 - g) * x["p_generator"] + g * jax.lax.stop_gradient(copied) + 1e-9)
        w = x["loss_mask"].astype(jnp.float32)
        return jnp.sum((pointer + mixed) * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def step(trainable, state, x):
        value, grads = jax.value_and_grad(loss_fn)(trainable, x)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    @jax.jit
    def measure(trainable, x):
        g, copied, best = forward(trainable, x)
        top = x["p_sources"].max(1)
        return {"gate": g, "p_copied": copied, "mass_at_best_source": best,
                "p_best_source": top, "p_generator": x["p_generator"],
                "p_mixed": (1 - g) * x["p_generator"] + g * copied,
                "p_oracle_mix": jnp.maximum(top, x["p_generator"])}

    return opt.init, step, measure


def summarize(measure, trainable, inputs) -> dict:
    """Means over the answer tokens of `measure`'s per-token arrays."""
    sums, n = {}, 0
    for x in inputs:
        at = np.asarray(x["loss_mask"])
        n += int(at.sum())
        for k, v in measure(trainable, x).items():
            sums[k] = sums.get(k, 0.0) + float(np.asarray(v)[at].sum())
    return {"answer_tokens": n, **{k: round(v / max(n, 1), 4) for k, v in sums.items()}}


def run(cfg, params, train_batches, eval_batches, steps: int, loss: str,
        learning_rate: float = 3e-3) -> dict:
    """Trains the pointer and gate for `steps` over `train_batches` (cycled) -> {before, after}
    summaries on `eval_batches`, the loss's first and last values and the seconds taken."""
    import jax

    start = time.perf_counter()
    train_in = frozen_inputs(cfg, params, train_batches)
    eval_in = frozen_inputs(cfg, params, eval_batches)
    trainable = {k: params[k] for k in POINTER_PARAMS + GATE_PARAMS if k in params}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    init, step, measure = make_step(cfg, frozen, loss, learning_rate)
    before = summarize(measure, trainable, eval_in)
    state, values = init(trainable), []
    for i in range(steps):
        trainable, state, value = step(trainable, state, train_in[i % len(train_in)])
        values.append(float(value))
    jax.block_until_ready(trainable)
    return {"loss": loss, "copy_content": cfg.copy_content, "steps": steps,
            "train_batches": len(train_in),
            "first_loss": round(float(np.mean(values[:10])), 4) if values else None,
            "last_loss": round(float(np.mean(values[-10:])), 4) if values else None,
            "before": before, "after": summarize(measure, trainable, eval_in),
            # The same on rows it trained on: capacity, against the evaluation's generalization.
            "after_on_train": summarize(measure, trainable, train_in[:8]),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv) -> None:
    del argv
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.data.world import make_world
    from clara_jax.model import ModelConfig
    from projects.demo import pretrain

    f = flags.FLAGS
    config = load_config()
    cfg = ModelConfig.from_config(config)
    if not cfg.latent_copy:
        raise SystemExit("pointer_isolation: needs --config.model.latent_copy=true")
    tok = load_tokenizer(f.tokenizer)
    fields = pretrain.featurizer_fields(tok, pretrain.pretrain_config(config, 32, 1e-3, 0.0, 1),
                                        1)
    train = pretrain.qa_batches(tok, {1: fields}, make_world(TRAIN_SEED, "medium", "train"),
                                32)[1][:f.train_batches]
    evals = pretrain.eval_batches(tok, {1: fields}, 32)[1]
    params = pretrain.load_params(f.params, cfg)
    print(json.dumps({"params": f.params, "learning_rate": f.learning_rate,
                      **run(cfg, params, train, evals, f.steps, f.loss, f.learning_rate)}))


if __name__ == "__main__":
    # Flags only when run: the tests import this module beside commands with flags of these names.
    define_config_flag()
    flags.DEFINE_string("params", None, "A params.safetensors (projects.demo.pretrain's output).")
    flags.DEFINE_string("tokenizer", "projects/demo/start/tokenizer", "The model's tokenizer.")
    flags.DEFINE_integer("steps", 400, "Pointer and gate steps.")
    flags.DEFINE_integer("train_batches", 64, "Batches of 32 QA rows of the training world.")
    flags.DEFINE_float("learning_rate", 3e-3, "Adam's learning rate.")
    flags.DEFINE_enum("loss", "soft", ["soft", "hard"], "The pointer's loss (module doc).")
    sys.argv[1:] = check_config_args(sys.argv[1:])
    app.run(main)
