"""The optimizer: global-norm clip, AdamW and a warmup-cosine (or constant) schedule, applied
only to the stage's trainable parameters through `clara_jax.model.partition` (frozen leaves
keep no optimizer state)."""

from __future__ import annotations

import ml_collections
import optax

from clara_jax.config import check_base_trainable
from clara_jax.model.partition import STAGE_TRAINABLE, partition


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate per update step: linear warmup over `train.warmup_frac` of the steps, then
    cosine decay to `train.min_lr_ratio` x peak ('cosine'), or flat after warmup ('constant')."""
    t = config.train
    peak = float(t.learning_rate)
    warmup = int(round(t.warmup_frac * t.steps))
    if t.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(t.steps, warmup + 1), end_value=peak * float(t.min_lr_ratio))


def make_base_tx(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip -> AdamW(b1, b2, weight decay) with the schedule; acts on trainable leaves."""
    t = config.train
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
    parts.append(optax.adamw(make_schedule(config), b1=float(t.adam_b1), b2=float(t.adam_b2),
                             weight_decay=float(t.weight_decay)))
    return optax.chain(*parts)


def trainable_groups(config: ml_collections.ConfigDict, stage: int) -> frozenset[str]:
    """The parameter groups (`clara_jax.model.param_group`) that `stage` updates:
    STAGE_TRAINABLE[stage], plus the base decoder when `train.train_base` (stages 1-2 only,
    for models trained from scratch such as the bundled demo)."""
    groups = STAGE_TRAINABLE[stage]
    if config.train.get("train_base", False) and stage in (1, 2):
        check_base_trainable(config)
        groups = groups | {"base"}
    return frozenset(groups)


def make_optimizer(config: ml_collections.ConfigDict, params, stage: int | None = None,
                   groups: frozenset[str] | None = None) -> optax.GradientTransformation:
    """The partitioned optimizer for `stage` (default `train.stage`) over `params` (arrays or
    ShapeDtypeStructs): the base transformation on the trainable leaves (the stage's groups, or
    `groups` when given, e.g. {"base"} for a language-model warm-up), zero updates and no
    state on the frozen ones."""
    stage = config.train.stage if stage is None else stage
    groups = trainable_groups(config, stage) if groups is None else frozenset(groups)
    return partition(make_base_tx(config), params, groups)
