"""Tiny model for the test suite: compiles and runs in seconds on a CPU."""

from clara_jax.config import base_config, finalize


def get_config(arg: str = ""):
    c = base_config()
    m = c.model
    m.vocab_size = 512
    m.dim = 64
    m.n_layers = 2
    m.n_heads = 4
    m.n_kv_heads = 2
    m.head_dim = 16
    m.mlp_dim = 128
    m.max_len = 512
    m.latent_dim = 32
    m.lora.rank = 4
    m.lora.alpha = 8.0
    m.lora.dropout = 0.0
    c.data.doc_max_len = 32
    c.data.compression_rate = 8
    c.data.chunk_overlap = 4
    c.data.question_max_len = 24
    c.data.answer_max_len = 12
    c.data.paraphrase_max_len = 32
    c.data.num_docs = 2
    c.data.num_candidates = 4
    c.train.steps = 20
    c.train.batch_size = 4
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    if arg:
        raise ValueError(f"configs/tiny.py takes no argument, got {arg!r}")
    return finalize(c)
