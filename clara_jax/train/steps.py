"""Step functions of the three CLaRa stages: pure `(state, batch, rng) -> (state, metrics)`.

Batches follow the shared contract (shape letters as in docs/design.md; Td = data.doc_max_len):
  stage 1/2: doc_tokens int32[B, K, Td], doc_mask bool[B, K, Td], tokens/mask/slot_mask/
             targets/loss_mask [B, T] (K = 1 in stage 1)
  stage 3:   query_tokens int32[B, Tq], query_mask bool[B, Tq], cand_tokens int32[B, C, Td],
             cand_mask bool[B, C, Td], pos_index int32[B], and the generator fields [B, T]
Stages 2-3 may hold text rows (data.text_share; `clara_jax.data.prompts`): no latent slots,
the documents' text in the prompt. Their answer CE counts like any row's; in stage 3 the
retrieval-alignment loss skips them (the generator read no latents there, so it says nothing
about the candidates' use), and the top-k selection they carry reaches no slot. InfoNCE and
recall@K, which score the query reasoner against the gold candidate alone, count every row.
Only the stage's trainable leaves (clara_jax.train.optimizer.trainable_groups) are
differentiated; the optimizer gives the frozen ones zero updates and keeps no state for them.
`train.grad_accum` splits the batch into that many microbatches inside the step (a scan), so
a step's memory is that of one microbatch and the loop and checkpoints are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax import losses
from clara_jax.data import prompts
from clara_jax.model import (
    ModelConfig,
    compress,
    encode_query,
    generate_logits,
    latent_span_logits,
)
from clara_jax.model.sharding import DEFAULT_RULES, batch_sharding
from clara_jax.train.optimizer import make_optimizer, make_schedule, trainable_groups
from clara_jax.train.state import (
    TrainState,
    merge_trainable,
    split_trainable,
    trainable_labels,
)

GEN_FIELDS = {"tokens": jnp.int32, "mask": bool, "slot_mask": bool, "targets": jnp.int32,
              "loss_mask": bool}


def batch_fields(config: ml_collections.ConfigDict, stage: int, batch_size: int | None = None,
                 gen_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The contract's fields for `stage` with their shapes and dtypes. `gen_len` (T) defaults
    to the data pipeline's fixed length for the stage."""
    d = config.data
    b = config.train.batch_size if batch_size is None else batch_size
    k = 1 if stage == 1 else d.num_docs
    t = gen_len if gen_len is not None else default_gen_len(config, stage)
    out = {name: jax.ShapeDtypeStruct((b, t), dt) for name, dt in GEN_FIELDS.items()}
    td = d.doc_max_len
    out["query_tokens"] = jax.ShapeDtypeStruct((b, d.question_max_len), jnp.int32)
    out["query_mask"] = jax.ShapeDtypeStruct((b, d.question_max_len), bool)
    out["pos_index"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    if stage in (1, 2):
        out["doc_tokens"] = jax.ShapeDtypeStruct((b, k, td), jnp.int32)
        out["doc_mask"] = jax.ShapeDtypeStruct((b, k, td), bool)
    else:
        c = d.num_candidates
        out["cand_tokens"] = jax.ShapeDtypeStruct((b, c, td), jnp.int32)
        out["cand_mask"] = jax.ShapeDtypeStruct((b, c, td), bool)
    return out


def default_gen_len(config: ml_collections.ConfigDict, stage: int) -> int:
    """T for a stage, as the data pipeline builds it (clara_jax.data.prompts)."""
    return prompts.generator_length(config, stage)


def _gen_ce(cfg, params, batch, latents, rng):
    logits, _ = generate_logits(cfg, params, batch["tokens"], batch["mask"], batch["slot_mask"],
                                latents, rng=rng)
    return losses.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])


def _gen_and_pointer_ce(cfg, params, batch, latents, rng):
    """(answer CE, target tokens, the copy path's own answer CE on the rows with latent
    slots) from one generator forward (train.pointer_weight)."""
    logits, _, copied = generate_logits(cfg, params, batch["tokens"], batch["mask"],
                                        batch["slot_mask"], latents, rng=rng, with_copied=True)
    ce, n = losses.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    latent_rows = jnp.any(batch["slot_mask"], axis=1, keepdims=True)
    pointer, _ = losses.token_cross_entropy(copied, batch["targets"],
                                            batch["loss_mask"] & latent_rows)
    return ce, n, pointer


def _rngs(rng, n: int) -> list:
    """n dropout keys, or n Nones for evaluation."""
    return [None] * n if rng is None else list(jax.random.split(rng, n))


def _span_loss(cfg: ModelConfig, params, latents, doc_tokens, doc_mask) -> jax.Array:
    """Span read-out of the documents from their latents [B*K, M, L]; tokens/mask [B*K, Td]."""
    td = doc_tokens.shape[-1]
    return losses.span_readout_loss(
        latent_span_logits(cfg, params, latents, td // cfg.num_memory_tokens), doc_tokens,
        doc_mask)


def _flat_docs(batch) -> tuple[jax.Array, jax.Array]:
    """A stage-1/2 batch's documents as rows: (tokens int32[B*K, Td], mask bool[B*K, Td])."""
    b, kd, td = batch["doc_tokens"].shape
    return batch["doc_tokens"].reshape(b * kd, td), batch["doc_mask"].reshape(b * kd, td)


def _in_batch_retrieval(cfg: ModelConfig, params, batch, latents, doc_tokens, tau: float,
                        rng) -> tuple[jax.Array, jax.Array]:
    """(InfoNCE float32[], recall@1 float32[]) of the questions against every document latent
    of the batch (latents [B*K, M, L]); the gold one is pos_index's of its own row."""
    b, kd = batch["doc_tokens"].shape[:2]
    # Questions through the compressor adapter: the stage-3 query reasoner starts as a copy of
    # it, and the index's keys are its latents.
    query = compress(cfg, params, batch["query_tokens"], batch["query_mask"], rng=rng)
    pos = batch["pos_index"]
    positive = jnp.where(pos >= 0, jnp.arange(b) * kd + pos, -1)
    return losses.in_batch_info_nce(query, latents, doc_tokens, positive, tau)


def _stage12_loss(config: ml_collections.ConfigDict, cfg: ModelConfig, params, batch, rng):
    """Stages 1-2: answer CE + MSE alignment, plus the span and retrieval terms when weighted."""
    t = config.train
    r_doc, r_gen, r_q = _rngs(rng, 3)
    b, kd = batch["doc_tokens"].shape[:2]
    doc_tokens, doc_mask = _flat_docs(batch)
    flat, doc_mean, mem_mean = compress(cfg, params, doc_tokens, doc_mask, rng=r_doc,
                                        with_means=True)
    latents = flat.reshape(b, kd, *flat.shape[1:])
    if float(t.pointer_weight) > 0:
        ce, n, pointer = _gen_and_pointer_ce(cfg, params, batch, latents, r_gen)
    else:
        ce, n = _gen_ce(cfg, params, batch, latents, r_gen)
    mse = losses.mse_alignment(doc_mean, mem_mean, jnp.any(doc_mask, axis=-1))
    loss = ce + float(t.mse_weight) * mse
    metrics = {"loss": loss, "ce": ce, "mse": mse, "target_tokens": n}
    if float(t.pointer_weight) > 0:
        loss = loss + float(t.pointer_weight) * pointer
        metrics.update(loss=loss, pointer=pointer)
    if float(t.span_weight) > 0:
        span = _span_loss(cfg, params, flat, doc_tokens, doc_mask)
        loss = loss + float(t.span_weight) * span
        metrics.update(loss=loss, span=span)
    if float(t.lambda_retrieval) > 0:
        nce, recall = _in_batch_retrieval(cfg, params, batch, flat, doc_tokens, float(t.tau),
                                          r_q)
        loss = loss + float(t.lambda_retrieval) * nce
        metrics.update(loss=loss, retrieval=nce, in_batch_recall_at_1=recall)
    return loss, metrics


def _with_span_warmup(config: ml_collections.ConfigDict, cfg: ModelConfig, loss_fn):
    """Stage 1 with train.span_warmup_steps = K: loss(params, batch, rng, step), the span
    read-out loss alone (times train.span_weight) while step < K, then `loss_fn`'s. The
    warm-up runs only the compressor: the metrics of the terms it does not compute (ce, mse,
    ...) are NaN there, and target_tokens 0."""
    k = int(config.train.span_warmup_steps)
    weight = float(config.train.span_weight)

    def warm(params, batch, rng):
        doc_tokens, doc_mask = _flat_docs(batch)
        latents = compress(cfg, params, doc_tokens, doc_mask, rng=_rngs(rng, 3)[0])
        span = _span_loss(cfg, params, latents, doc_tokens, doc_mask)
        shapes = jax.eval_shape(loss_fn, params, batch, rng)[1]
        metrics = {name: jnp.full(x.shape, jnp.nan, x.dtype) for name, x in shapes.items()}
        metrics.update(loss=weight * span, span=span,
                       target_tokens=jnp.zeros_like(metrics["target_tokens"]))
        return weight * span, metrics

    def loss(params, batch, rng, step):
        return jax.lax.cond(step < k, warm, loss_fn, params, batch, rng)

    return loss


def _candidate_latents(cfg: ModelConfig, params, batch) -> tuple[jax.Array, jax.Array]:
    """(latents [B, C, M, L], valid bool[B, C]) of the stage-3 candidates."""
    b, c, td = batch["cand_tokens"].shape
    # The compressor is frozen in stage 3: candidate latents are inputs, not parameters'
    # functions to differentiate (and no dropout: the frozen encoder runs as at inference).
    cand = compress(cfg, params, batch["cand_tokens"].reshape(b * c, td),
                    batch["cand_mask"].reshape(b * c, td))
    cand = jax.lax.stop_gradient(cand.reshape(b, c, *cand.shape[1:]))
    return cand, jnp.any(batch["cand_mask"], axis=-1)


def _answer_and_alignment(t: ml_collections.ConfigDict, cfg: ModelConfig, params, batch,
                          scores, cand, selected, valid, k: int, rng):
    """(answer CE, target tokens, retrieval-alignment loss) of the generator reading the
    soft-selected latents [B, K, M, L]; scores [B, C], cand [B, C, M, L], valid [B, C]."""
    if not t.lambda_align > 0:
        ce, n = _gen_ce(cfg, params, batch, selected, rng)
        return ce, n, jnp.zeros((), jnp.float32)
    # The generator's use of each candidate: first-order change of its answer loss if
    # candidate c were read in each slot (see losses.retrieval_alignment_loss).
    (ce, n), g_sel = jax.value_and_grad(
        lambda s: _gen_ce(cfg, params, batch, s, rng), has_aux=True)(selected)
    g_sel = jax.lax.stop_gradient(g_sel)
    utility = -jnp.einsum("bkml,bcml->bc", g_sel, cand.astype(jnp.float32)) / k
    has_slots = jnp.any(batch["slot_mask"], axis=-1)  # [B]; False: a text row
    align = losses.retrieval_alignment_loss(scores, utility, float(t.tau), float(t.align_tau),
                                            valid, has_slots)
    return ce, n, align


def _topk_recall(w, pos) -> jax.Array:
    """Share of rows with a gold candidate (pos int32[B] >= 0) whose gold one is among the
    top-k picks of w [B, K, C]."""
    picked = jnp.argmax(w, axis=-1)  # [B, K]
    has_pos = pos >= 0
    hit = jnp.any(picked == pos[:, None], axis=-1) & has_pos
    return jnp.sum(hit) / jnp.maximum(jnp.sum(has_pos), 1)


def _stage3_loss(config: ml_collections.ConfigDict, cfg: ModelConfig, params, batch, rng):
    """Stage 3: answer CE through a differentiable top-k of the candidates, plus the
    retrieval-alignment and InfoNCE terms of the query reasoner."""
    t = config.train
    k = config.data.num_docs
    r_q, r_gen = _rngs(rng, 2)
    cand, valid = _candidate_latents(cfg, params, batch)
    query = encode_query(cfg, params, batch["query_tokens"], batch["query_mask"], rng=r_q)
    scores = losses.cosine_scores(query, cand)  # [B, C]
    w = losses.differentiable_topk(scores, k, float(t.tau), valid)  # [B, K, C]
    selected = jnp.einsum("bkc,bcml->bkml", w, cand.astype(jnp.float32))
    ce, n, align = _answer_and_alignment(t, cfg, params, batch, scores, cand, selected, valid,
                                         k, r_gen)
    nce, _ = losses.info_nce(query, cand, batch["pos_index"], float(t.tau), valid)
    loss = ce + float(t.lambda_align) * align + float(t.lambda_infonce) * nce
    recall = _topk_recall(w, batch["pos_index"])
    return loss, {"loss": loss, "ce": ce, "align": align, "infonce": nce,
                  f"recall_at_{k}": recall.astype(jnp.float32), "target_tokens": n}


def make_loss_fn(config: ml_collections.ConfigDict, cfg: ModelConfig, stage: int):
    """loss(params, batch, rng) -> (loss float32[], metrics dict of float32[]).

    `rng` is None for evaluation (no dropout), a key for training.
    """
    loss = _stage12_loss if stage in (1, 2) else _stage3_loss
    return functools.partial(loss, config, cfg)


def _tokens_in(batch) -> jax.Array:
    """Valid input tokens the step processes (documents, candidates, query, generator)."""
    n = jnp.sum(batch["mask"])
    for key in ("doc_mask", "cand_mask", "query_mask"):
        if key in batch:
            n = n + jnp.sum(batch[key])
    return n.astype(jnp.float32)


def make_train_step(config: ml_collections.ConfigDict, cfg: ModelConfig, stage: int,
                    params_like, loss_fn=None, groups: frozenset[str] | None = None):
    """The stage's step: (state, batch, rng) -> (state, metrics).

    Metrics (float32[] each): loss and its terms, grad_norm (of the trainable leaves, before
    clipping), lr, tokens, target_tokens, nonfinite (1 when the loss or gradient was not
    finite: then the update is skipped and params/opt_state are returned unchanged, whatever
    train.nan_policy says; the loop decides whether to stop).

    `loss_fn(cfg) -> loss(params, batch, rng) -> (loss, metrics)` and `groups` (the trainable
    parameter groups) replace the stage's, for a step with another objective (the
    language-model warm-up); `batch["mask"]` must mark its input tokens.
    """
    groups = trainable_groups(config, stage) if groups is None else frozenset(groups)
    if "base" in groups:
        cfg = dataclasses.replace(cfg, kernels_train=True)
    if loss_fn is None and stage == 1 and int(config.train.span_warmup_steps):
        loss_of = _with_span_warmup(config, cfg, make_loss_fn(config, cfg, stage))
    else:
        plain = make_loss_fn(config, cfg, stage) if loss_fn is None else loss_fn(cfg)
        loss_of = lambda params, batch, rng, step: plain(params, batch, rng)  # noqa: E731
    labels = trainable_labels(config, params_like, stage, groups)
    tx = make_optimizer(config, params_like, stage, groups)
    schedule = make_schedule(config)
    accum = int(config.train.grad_accum)

    def grads_of(train, frozen, batch, rng, step):
        def f(tp):
            return loss_of(merge_trainable(labels, tp, frozen), batch, rng, step)
        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(train)
        return grads, metrics

    def step(state: TrainState, batch, rng):
        train, frozen = split_trainable(state.params, labels)
        if accum == 1:
            grads, metrics = grads_of(train, frozen, batch, rng, state.step)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, inputs):
                i, mb = inputs
                g, m = grads_of(train, frozen, mb, jax.random.fold_in(rng, i), state.step)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zero = jax.eval_shape(lambda: grads_of(train, frozen, jax.tree.map(
                lambda x: x[0], micro), rng, state.step))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (grads, metrics), _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro))
            grads = jax.tree.map(lambda g: g / accum, grads)
            sums = {"target_tokens"}
            metrics = {k: v if k in sums else v / accum for k, v in metrics.items()}
        grad_norm = optax.tree.norm(grads)
        full = merge_trainable(labels, grads, jax.tree.map(
            lambda lab, p: None if lab == "trainable" else jnp.zeros_like(p), labels,
            state.params))
        updates, opt_state = tx.update(full, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                       tokens=_tokens_in(batch),
                       nonfinite=(~finite).astype(jnp.float32))
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return step


def make_eval_step(config: ml_collections.ConfigDict, cfg: ModelConfig, stage: int):
    """(params, batch) -> metrics, no dropout, no update."""
    loss_fn = make_loss_fn(config, cfg, stage)

    def step(params, batch):
        _, metrics = loss_fn(params, batch, None)
        return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return step


def batch_shardings(mesh, fields: dict) -> dict:
    """Each batch field sharded on its leading (batch) axis by the logical rules."""
    return {k: batch_sharding(mesh, len(v.shape)) for k, v in fields.items()}


def rng_for_step(state_rng, step: int):
    """The dropout key of step `step`: a pure function of the run's base key and the step, so
    a resumed run draws the same keys as an uninterrupted one."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state_rng), step))


def compile_train_step(step_fn, mesh, state_sh, abstract_state, fields: dict):
    """`jax.jit` with shardings and the state donated, compiled ahead of time for the given
    abstract state and batch fields. Returns (compiled, lowered-batch shardings)."""
    b_sh = batch_shardings(mesh, fields)
    replicated = NamedSharding(mesh, PartitionSpec())

    def wrapped(state, batch, rng):
        return step_fn(state, batch, jax.random.wrap_key_data(rng))

    jitted = jax.jit(wrapped, in_shardings=(state_sh, b_sh, replicated),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        lowered = jitted.lower(abstract_state, fields,
                               jax.ShapeDtypeStruct((2,), jnp.uint32))
        compiled = lowered.compile()
    return compiled, b_sh
