"""Default experiment config, derived fields and validation.

Every file in `configs/` starts from `base_config()` and changes what it needs. `finalize()`
validates once and fills the derived fields (the number of memory tokens M); errors name the
field, e.g. `config.data.doc_max_len`.

Fields: docs/config.md (tests/test_config_reference.py keeps it equal to `base_config()`).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
from pathlib import Path

import ml_collections

ADAPTERS = ("compressor", "query", "generator")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "projections")
MEMORY_LAYOUTS = ("append", "interleave", "spread")
LATENT_POSITIONS = ("packed", "spread")
COMPRESSOR_ATTENTION = ("causal", "bidirectional")
DTYPES = ("float32", "bfloat16")
STAGE_DOC_CHUNKS = ("truncate", "answer")

# Two facts of the data package that validation needs live here, because config sits left of
# data (docs/design.md) and clara_jax.data imports them from this module.
# Framing tokens of a compressor input: <ENC>, BOS, EOS (clara_jax.data.prompts).
DOC_FRAME = 3
# The generated world's sizes (clara_jax.data.world.SIZES says what each holds). A world size
# names both worlds' size, or the train world's and the held-out world's: "medium/small"
# trains on ten times the documents and still evaluates on the small world.
WORLD_SIZE_NAMES = ("small", "medium")
WORLD_SIZES = (*WORLD_SIZE_NAMES, *(f"{a}/{b}" for a in WORLD_SIZE_NAMES
                                    for b in WORLD_SIZE_NAMES))


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    m = c.model
    m.vocab_size = 32000
    m.dim = 4096  # D
    m.n_layers = 32
    m.n_heads = 32  # N
    m.n_kv_heads = 8  # G
    m.head_dim = 128  # H
    m.mlp_dim = 14336  # F
    m.rope_theta = 10000.0
    m.norm_eps = 1e-5
    m.qkv_bias = False  # True for Qwen2
    m.tie_embeddings = False
    m.max_len = 4096
    m.latent_dim = 0  # L; 0 means L = D (no projection)
    # "append": memory tokens after the document (the published method); "interleave": memory
    # token j after the document's j-th chunk (clara_jax.model.clara.memory_order); "spread":
    # appended, at the RoPE position of the end of chunk j (spread_memory_positions).
    m.memory_layout = "append"
    # The compressor pass (documents and queries into latents): "causal" as published, or
    # "bidirectional" (every token, memory tokens included, sees the whole sequence).
    m.compressor_attention = "causal"
    # "packed": latent slots take one RoPE position each (the published method); "spread": each
    # takes data.compression_rate positions, where the text it stands for would sit.
    m.latent_positions = "packed"
    # Scale of a fixed code of each compressor input token's sub-position (its index mod
    # data.compression_rate: which of its latent's R tokens it is) added to its embedding; 0:
    # off (the published method). RoPE binds position to queries and keys, never to values, so a
    # memory token that averages its span reads a bag of tokens; at the embeddings' own scale
    # (model.init_std) the code tripled the compressor's write at rate 18 (projects/channel).
    m.span_code = 0.0
    # A learned span read-out head for train.span_weight: one L -> V map per sub-position r
    # (params "span_head", float32[R, L, V], R = data.compression_rate), trained with the
    # compressor in stages 1-2 and read by nothing at inference. Off: the read-out has no
    # parameters (a fixed permutation per r against the token embeddings), which did not open
    # the channel at 18 tokens a latent (projects/channel/README.md, sixth session).
    m.span_head = False
    # A linear write beside the memory tokens: latent j also gets the final hidden states of
    # the j-th data.compression_rate tokens of the document, concatenated in order, times a
    # learned kernel (params "chunk_write", float32[R, D, L], zero at init, so training starts
    # from the published write). Off: the latents are the memory tokens' states alone.
    m.chunk_write = False
    # The generator's copy path (params "copy_*", the generator side): its output distribution
    # is mixed, by a learned gate, with attention over the K·M·R (latent, sub-position) pairs
    # whose values are model.span_head's read-outs, as pointer-generator networks copy from
    # their source; decoding keeps the pairs' keys and read-outs in the KV cache. Needs
    # model.span_head. Off: the generator reads the latents through its layers alone.
    m.latent_copy = False
    # The copy path's pointer also matches by content (params "copy_content_query",
    # "copy_content_key"): each pair's key gains, in dimensions RoPE leaves alone, its
    # read-out's expected output embedding, so the pointer can pick a sub-position by the
    # token it reads, and that of the pair before it ("copy_previous_key"), so the last answer
    # token finds the pair after it. Without it a latent's sub-positions differ only by a
    # learned code of r.
    # Needs model.latent_copy.
    m.copy_content = False
    m.scan_layers = False
    m.remat = "none"
    m.dtype = "float32"  # compute dtype; trainable params stay float32 (master weights)
    # Storage dtype of the frozen base decoder's weights (embeddings, kernels, norms). The
    # adapters, memory embeddings and latent projections stay float32 for the optimizer;
    # "bfloat16" halves a 7B base's memory and checkpoints, and needs train.train_base=False.
    m.base_dtype = "float32"
    m.init_std = 0.02
    # Derived by finalize() from data.doc_max_len // data.compression_rate.
    m.num_memory_tokens = -1  # M

    m.lora = ml_collections.ConfigDict()
    m.lora.rank = 16
    m.lora.alpha = 32.0
    m.lora.dropout = 0.1
    m.lora.targets = LORA_TARGETS
    m.lora.adapters = ADAPTERS

    c.data = ml_collections.ConfigDict()
    c.data.doc_max_len = 256
    c.data.compression_rate = 16
    c.data.chunk_overlap = 32
    # Stage 1-3 documents longer than doc_max_len, at build time (clara data build):
    # "truncate" keeps them whole and the pipeline cuts them to doc_max_len tokens; "answer"
    # replaces each by one of the chunks the corpus build (and so the index) splits it into:
    # the first chunk that holds the row's answer, else the first (tfds_build._StageChunker).
    c.data.stage_doc_chunks = "truncate"
    c.data.question_max_len = 64
    c.data.answer_max_len = 32
    # Stage-1 paraphrase targets (the whole document restated) get their own length: cut to
    # answer_max_len they kept only the document's opening, so the compressor was never asked
    # to carry the rest of its facts.
    c.data.paraphrase_max_len = 256
    c.data.num_docs = 5  # K
    c.data.num_candidates = 20  # C
    # Training split, stages 2-3: the share of examples whose prompt carries the documents'
    # text in place of their latent slots, framed as the text-RAG baseline's prompt at
    # inference (prompts.text_generator_example), so that the eval's `text` mode reads a
    # generator trained on text too; 0 trains on latents only, as published.
    c.data.text_share = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.stage = 1
    c.train.steps = 1000
    c.train.batch_size = 8
    c.train.learning_rate = 1e-4
    c.train.schedule = "cosine"
    c.train.warmup_frac = 0.03
    c.train.seed = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.min_lr_ratio = 0.1  # cosine decays to this fraction of learning_rate
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.95
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0  # global-norm clip; 0 disables
    c.train.grad_accum = 1  # microbatches per step; must divide batch_size
    # Stages 1-2: CE + mse_weight * MSE(doc mean, memory mean). Off: the published 0.1 makes
    # every document's latents one vector from a random start, and from a stop-gradient
    # document target too (bench/channel.py, projects/channel/README.md).
    c.train.mse_weight = 0.0
    # Stages 1-2: weight of the span read-out loss (losses.span_readout_loss): latent j must
    # name the j-th data.compression_rate tokens of its document, in order. For decoders
    # trained from scratch, where the channel otherwise opens slowly (bench/channel.py).
    c.train.span_weight = 0.0
    # Stage 1: the first this many steps train the span read-out loss alone (the compressor
    # and model.span_head write before the generator reads; needs train.span_weight > 0).
    # Without it, and without the read-out kept after, the generator's loss erased the write.
    c.train.span_warmup_steps = 0
    # Stages 1-2, model.latent_copy: weight of the copy path's own answer CE (its pointer's
    # read-out distribution before the gate, on rows that read latents). The gate shuts
    # while the pointer does not point, and a shut gate passes the pointer no gradient.
    c.train.pointer_weight = 0.0
    c.train.tau = 0.02  # stage 3: differentiable top-k temperature on cosine scores
    c.train.lambda_align = 0.0  # stage 3: weight of the retrieval-alignment loss
    c.train.align_tau = 1.0  # stage 3: temperature of the generator-utility target
    c.train.lambda_infonce = 0.0  # stage 3: weight of InfoNCE on pos_index (supervised)
    # Stages 1-2: weight of in-batch InfoNCE between each question's latents (compressor
    # adapter, which the stage-3 query reasoner starts from) and the batch's documents.
    c.train.lambda_retrieval = 0.0
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0  # 0 disables periodic evaluation
    c.train.eval_batches = 4
    c.train.eval_split = "heldout"  # the data split periodic evaluation reads
    c.train.nan_policy = "stop"  # 'stop' or 'skip' (skip the update of a non-finite step)
    c.train.train_base = False  # stages 1-2: also train the base decoder (from-scratch models)
    c.train.data_dir = ""  # where the data pipeline's prepared files live
    # Steps to record with the JAX profiler (process 0), starting after the run's first step
    # (which carries one-time costs); the trace lands in WORKDIR/tb/plugins/profile. 0: off.
    c.train.profile_steps = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 takes the devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def saved_config(saved: dict) -> ml_collections.ConfigDict:
    """The config a checkpoint or bundle was saved with (a plain dict), with the fields added to
    `base_config()` since then set to their defaults, so that older runs still load."""

    def fill(into: dict, defaults: dict) -> dict:
        for key, value in defaults.items():
            if key not in into:
                into[key] = value
            elif isinstance(value, dict) and isinstance(into[key], dict):
                fill(into[key], value)
        return into

    return ml_collections.ConfigDict(fill(copy.deepcopy(saved), base_config().to_dict()))


def _fail(field: str, value, why: str):
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _validate_model(m: ml_collections.ConfigDict) -> None:
    """config.model but its lora section."""
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "mlp_dim", "max_len"):
        if int(m[field]) <= 0:
            _fail(f"model.{field}", m[field], "must be positive")
    if m.n_heads % m.n_kv_heads:
        _fail("model.n_kv_heads", m.n_kv_heads,
              f"must divide model.n_heads={m.n_heads} (grouped-query attention)")
    if m.head_dim % 2:
        _fail("model.head_dim", m.head_dim, "must be even (RoPE rotates pairs)")
    if m.rope_theta <= 0:
        _fail("model.rope_theta", m.rope_theta, "must be positive")
    if not 0 <= m.latent_dim <= m.dim:
        _fail("model.latent_dim", m.latent_dim, f"must be in [0, model.dim={m.dim}]")
    if m.remat not in REMAT_POLICIES:
        _fail("model.remat", m.remat, f"must be one of {REMAT_POLICIES}")
    if m.memory_layout not in MEMORY_LAYOUTS:
        _fail("model.memory_layout", m.memory_layout, f"must be one of {MEMORY_LAYOUTS}")
    if m.compressor_attention not in COMPRESSOR_ATTENTION:
        _fail("model.compressor_attention", m.compressor_attention,
              f"must be one of {COMPRESSOR_ATTENTION}")
    if m.latent_positions not in LATENT_POSITIONS:
        _fail("model.latent_positions", m.latent_positions, f"must be one of {LATENT_POSITIONS}")
    if not m.span_code >= 0:  # also refuses NaN
        _fail("model.span_code", m.span_code, "must be >= 0 (0: off)")
    if m.copy_content and not m.latent_copy:
        _fail("model.copy_content", m.copy_content,
              "needs model.latent_copy=True (it is a part of the copy path's pointer)")
    if m.latent_copy and not m.span_head:
        _fail("model.latent_copy", m.latent_copy,
              "needs model.span_head=True (its read-outs are what the copy path copies)")
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"must be one of {DTYPES}")
    if m.base_dtype not in DTYPES:
        _fail("model.base_dtype", m.base_dtype, f"must be one of {DTYPES}")


def _validate_lora(lo: ml_collections.ConfigDict) -> None:
    """config.model.lora."""
    if lo.rank < 0:
        _fail("model.lora.rank", lo.rank, "must be >= 0")
    if lo.rank and lo.alpha <= 0:
        _fail("model.lora.alpha", lo.alpha, "must be positive")
    if not 0.0 <= lo.dropout < 1.0:
        _fail("model.lora.dropout", lo.dropout, "must be in [0, 1)")
    bad = [t for t in lo.targets if t not in LORA_TARGETS]
    if bad:
        _fail("model.lora.targets", tuple(lo.targets),
              f"unknown layers {bad}; known: {LORA_TARGETS}")
    if set(lo.adapters) != set(ADAPTERS) or len(lo.adapters) != len(ADAPTERS):
        _fail("model.lora.adapters", tuple(lo.adapters), f"must name exactly {ADAPTERS}")


def _validate_data(d: ml_collections.ConfigDict) -> None:
    """config.data."""
    if d.compression_rate <= 0:
        _fail("data.compression_rate", d.compression_rate, "must be positive")
    if d.doc_max_len <= 0 or d.doc_max_len % d.compression_rate:
        _fail("data.doc_max_len", d.doc_max_len,
              f"must be a positive multiple of data.compression_rate={d.compression_rate}")
    # Chunks are cut from the document's room inside the <ENC> BOS ... EOS frame.
    if not 0 <= d.chunk_overlap < d.doc_max_len - DOC_FRAME:
        _fail("data.chunk_overlap", d.chunk_overlap,
              f"must be in [0, data.doc_max_len - {DOC_FRAME}) (the document's room inside its "
              f"<ENC> BOS ... EOS frame, {d.doc_max_len - DOC_FRAME} tokens)")
    if d.stage_doc_chunks not in STAGE_DOC_CHUNKS:
        _fail("data.stage_doc_chunks", d.stage_doc_chunks, f"must be one of {STAGE_DOC_CHUNKS}")
    for field in ("question_max_len", "answer_max_len", "paraphrase_max_len"):
        if d[field] < 2:
            _fail(f"data.{field}", d[field], "must be >= 2")
    for field in ("text_share",):
        if not 0.0 <= d[field] <= 1.0:
            _fail(f"data.{field}", d[field], "must be in [0, 1]")
    if not 1 <= d.num_docs <= d.num_candidates:
        _fail("data.num_docs", d.num_docs,
              f"must be in [1, data.num_candidates={d.num_candidates}]")


def _validate_train(c: ml_collections.ConfigDict) -> None:
    """config.train (and whether the base it trains can be trained)."""
    t = c.train
    if t.stage not in (1, 2, 3):
        _fail("train.stage", t.stage, "must be 1, 2 or 3")
    for field in ("steps", "batch_size", "log_every", "checkpoint_every"):
        if t[field] <= 0:
            _fail(f"train.{field}", t[field], "must be positive")
    if t.schedule not in ("cosine", "constant"):
        _fail("train.schedule", t.schedule, "must be 'cosine' or 'constant'")
    if not 0.0 <= t.warmup_frac < 1.0:
        _fail("train.warmup_frac", t.warmup_frac, "must be in [0, 1)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        _fail("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    if t.learning_rate <= 0:
        _fail("train.learning_rate", t.learning_rate, "must be positive")
    for field in ("adam_b1", "adam_b2"):
        if not 0.0 <= t[field] < 1.0:
            _fail(f"train.{field}", t[field], "must be in [0, 1)")
    for field in ("weight_decay", "grad_clip", "mse_weight", "lambda_align", "lambda_infonce",
                  "lambda_retrieval", "span_weight", "pointer_weight"):
        if t[field] < 0:
            _fail(f"train.{field}", t[field], "must be >= 0")
    for field in ("tau", "align_tau"):
        if t[field] <= 0:
            _fail(f"train.{field}", t[field], "must be positive")
    for field in ("grad_accum", "keep_checkpoints", "eval_batches"):
        if t[field] < 1:
            _fail(f"train.{field}", t[field], "must be >= 1")
    if t.batch_size % t.grad_accum:
        _fail("train.grad_accum", t.grad_accum,
              f"must divide train.batch_size={t.batch_size}")
    if t.profile_steps < 0:
        _fail("train.profile_steps", t.profile_steps,
              "must be >= 0 (steps to trace; 0 disables the profiler)")
    if t.span_warmup_steps < 0:
        _fail("train.span_warmup_steps", t.span_warmup_steps, "must be >= 0 (0: no warm-up)")
    if t.span_warmup_steps and not t.span_weight > 0:
        _fail("train.span_warmup_steps", t.span_warmup_steps,
              "needs train.span_weight > 0 (the warm-up trains the span read-out loss alone)")
    if t.pointer_weight and not c.model.latent_copy:
        _fail("train.pointer_weight", t.pointer_weight,
              "needs model.latent_copy=True (it trains the copy path's pointer)")
    if t.eval_every < 0:
        _fail("train.eval_every", t.eval_every, "must be >= 0 (0 disables evaluation)")
    if t.train_base and t.stage == 3:
        _fail("train.train_base", t.train_base,
              "must be False in stage 3 (the compressor, which shares the base, is frozen)")
    if t.train_base and c.model.base_dtype != "float32":
        check_base_trainable(c)
    if t.nan_policy not in ("stop", "skip"):
        _fail("train.nan_policy", t.nan_policy, "must be 'stop' or 'skip'")


def _validate_mesh(c: ml_collections.ConfigDict) -> None:
    """config.mesh, and the batch against it once the mesh is fixed."""
    fills = [a for a in ("data", "fsdp", "tensor") if c.mesh[a] == -1]
    for a in ("data", "fsdp", "tensor"):
        if c.mesh[a] == 0 or c.mesh[a] < -1:
            _fail(f"mesh.{a}", c.mesh[a], "must be positive, or -1 to fill")
    if len(fills) > 1:
        _fail(f"mesh.{fills[1]}", -1, f"only one mesh axis may be -1 (mesh.{fills[0]} is too)")
    if c.mesh.data != -1 and c.mesh.fsdp != -1:
        check_batch_fits_mesh(c, int(c.mesh.data) * int(c.mesh.fsdp))


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field."""
    _validate_model(c.model)
    _validate_lora(c.model.lora)
    _validate_data(c.data)
    _validate_train(c)
    _validate_mesh(c)


def check_base_trainable(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError unless the base decoder can be trained: AdamW steps on bfloat16
    weights round most updates away, so a trained base must be stored in float32. Called by
    `validate` for train.train_base, and by `trainable_groups` for the runs that set it
    themselves (the demo's stages 1-2, world pretraining, the LM warm-up)."""
    if c.model.base_dtype != "float32":
        _fail("model.base_dtype", c.model.base_dtype,
              "must be 'float32' when the base decoder trains (train.train_base, or a "
              "run that trains it itself such as the demo's): AdamW updates on bfloat16 "
              "weights round away")


def check_batch_fits_mesh(c: ml_collections.ConfigDict, batch_shards: int) -> None:
    """Each microbatch (train.batch_size / train.grad_accum rows) is split over the mesh's
    batch axes (data x fsdp); raises ConfigError unless it divides evenly. Called by
    `validate` when both axes are given, and with the device count once a -1 axis is
    filled (the device count is only known after start-up)."""
    t = c.train
    micro = int(t.batch_size) // max(int(t.grad_accum), 1)
    if micro % batch_shards:
        _fail("train.batch_size", t.batch_size,
              f"its microbatches of {micro} rows (batch_size / train.grad_accum="
              f"{t.grad_accum}) must split evenly over the mesh's batch axes, data x fsdp = "
              f"{batch_shards} devices; use a multiple of {batch_shards * int(t.grad_accum)} "
              "or set --config.mesh.data / --config.mesh.fsdp")


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates `c` and fills derived fields in place; returns it."""
    validate(c)
    c.model.num_memory_tokens = c.data.doc_max_len // c.data.compression_rate
    return c


def _cast_override(current, value: str):
    """A "a.b=value" override's text as the type of the field's current value: booleans from
    1/true/yes, tuples and lists from a Python literal or comma-separated items (each item cast
    like the first element), anything else by the type's constructor."""
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, (tuple, list)):
        try:
            items = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            items = [v.strip() for v in value.split(",") if v.strip()]
        items = list(items) if isinstance(items, (tuple, list)) else [items]
        if current:
            items = [_cast_override(current[0], str(v)) for v in items]
        return type(current)(items)
    return type(current)(value)


def load_config_file(path: str, overrides=()) -> ml_collections.ConfigDict:
    """The finalized config of a config file, "FILE" or "FILE:ARG" (its get_config(ARG)), with
    "a.b=value" overrides (cast to the field's type), for scripts that do not use absl flags."""
    file, _, arg = str(path).partition(":")
    spec = importlib.util.spec_from_file_location("clara_config_file", file)
    if spec is None or not Path(file).is_file():
        raise FileNotFoundError(f"config file {file!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = _cast_override(node[leaf], value)
    return finalize(config)

