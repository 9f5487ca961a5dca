"""The train state, its shardings on a mesh, and the split into trainable and frozen parts.

The state is one pytree: `step` int32[], `params` (the full CLaRa tree, float32 master
weights), `opt_state` (the partitioned optimizer's state: moments only for trainable
leaves) and `rng` uint32[2] (raw key data, so checkpoints hold plain arrays).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax.model import ModelConfig, abstract_params, param_shardings
from clara_jax.model.partition import param_labels
from clara_jax.train.optimizer import make_optimizer, trainable_groups


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def trainable_labels(config: ml_collections.ConfigDict, params, stage: int,
                     groups: frozenset[str] | None = None):
    """'trainable' / 'frozen' per leaf for `stage` (see optimizer.trainable_groups), or for
    the parameter groups `groups` when given."""
    return param_labels(params, trainable_groups(config, stage) if groups is None
                        else frozenset(groups))


def split_trainable(params, labels):
    """(trainable, frozen): two trees shaped like `params` with None where the other holds the
    leaf, so `jax.grad` over the first differentiates only the trainable leaves."""
    train = jax.tree.map(lambda lab, p: p if lab == "trainable" else None, labels, params)
    frozen = jax.tree.map(lambda lab, p: None if lab == "trainable" else p, labels, params)
    return train, frozen


def merge_trainable(labels, train, frozen):
    """Inverse of `split_trainable`."""
    return jax.tree.map(lambda lab, a, b: a if lab == "trainable" else b, labels, train, frozen,
                        is_leaf=lambda x: x is None)


def init_query_adapter(params):
    """Stage-3 start: the query reasoner's LoRA factors copied from the compressor's
    (docs/design.md: the query adapter is initialised from the compressor adapter). Copies, not
    aliases, so a donated state never holds one buffer twice."""
    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        for k in tree:
            if k.startswith("lora_compressor_"):
                out["lora_query_" + k[len("lora_compressor_"):]] = jnp.copy(tree[k])
        return out
    return walk(params)


def create_state(config: ml_collections.ConfigDict, params, stage: int | None = None,
                 seed: int | None = None, groups: frozenset[str] | None = None) -> TrainState:
    """A step-0 state over `params` with a fresh optimizer state (for the stage's trainable
    groups, or `groups`) and the run's base key."""
    stage = config.train.stage if stage is None else stage
    seed = config.train.seed if seed is None else seed
    tx = make_optimizer(config, params, stage, groups)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def abstract_state(config: ml_collections.ConfigDict, cfg: ModelConfig,
                   stage: int | None = None) -> TrainState:
    """The state as ShapeDtypeStructs; allocates nothing."""
    return jax.eval_shape(lambda p: create_state(config, p, stage), abstract_params(cfg))


def _param_path(path) -> tuple[str, ...]:
    """The trailing run of dict keys of a state leaf's path: for an optimizer moment
    (`...mu['decoder']['layers_0']...`) that is the path of the parameter it belongs to."""
    keys: list[str] = []
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(str(entry.key))
        else:
            break
    return tuple(reversed(keys))


def state_shardings(cfg: ModelConfig, mesh, state: TrainState):
    """NamedShardings for every leaf of `state` (arrays or ShapeDtypeStructs): params by the
    logical rules; optimizer moments like the parameter they belong to; scalars replicated."""
    param_sh = param_shardings(cfg, mesh)
    by_path = {_param_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        s = by_path.get(_param_path(path))
        if s is not None and len(s.spec) <= len(leaf.shape):
            return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, state)
