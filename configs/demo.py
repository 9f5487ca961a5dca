"""Bundled-data demo: a small decoder trained from scratch on the generated knowledge world,
sized so that `make demo` finishes in minutes on a 2-core CPU. `c.demo` is the demo's own
section (projects/demo: `python -m projects.demo.run`, which validates it); the library
ignores it."""

import ml_collections

from clara_jax.config import base_config, finalize


def demo_section() -> ml_collections.ConfigDict:
    """What `projects.demo.run` runs: steps and peak learning rate per stage, the start, the
    world, the evaluation (defaults; docs/config.md, "demo")."""
    d = ml_collections.ConfigDict()
    d.stage_steps = (100, 50, 25)
    d.stage_lr = (1e-3, 5e-4, 1e-4)
    d.train_base = True  # no pretrained decoder for small configs: stages 1-2 train it
    # Next-token steps on the train world's text before stage 1 (projects.demo.warmup), for
    # from-scratch decoders; 0 skips the warm-up.
    d.warmup_steps = 0
    d.warmup_lr = 1e-3
    # A model pretrained on generated worlds (projects.demo.pretrain: OUT/params.safetensors
    # and OUT/tokenizer) to start stage 1 from, instead of from scratch; "" for none. Relative
    # paths are read from the current directory, else from the repository.
    d.pretrained = ""
    # Training split: the probability that an example's answer is swapped, in its documents
    # and its target alike, for another answer to the same kind of question
    # (projects/demo/answer_swap.py), so that it cannot be answered from memory.
    d.swap_answers = 0.0
    d.world_seed = 0
    d.world_size = "small"
    d.eval_questions = 200
    d.eval_batch_size = 32
    return d


def get_config(arg: str = ""):
    """The demo's config; `configs/demo.py:16x` the same at 16x without the copy path."""
    c = base_config()
    c.demo = demo_section()
    m = c.model
    # The 16x tokenizer's 2,048 ids (8 of them memory symbols) and the 24 memory symbols
    # appended when the start was re-rated to 4x's 32 (projects/demo/rerate.py).
    m.vocab_size = 2072
    # Widths that keep XLA:CPU's matmuls busy: at D=192, H=32, F=512 (4 layers) the step spent
    # half its time outside the matmuls (bench/train_step.py: flops_utilization 0.52 against
    # 0.66 here), for the same demo scores and wall time.
    m.dim = 256
    m.n_layers = 3
    m.n_heads = 4
    m.n_kv_heads = 2
    m.head_dim = 64
    m.mlp_dim = 768
    m.max_len = 1024
    m.latent_dim = 64
    m.lora.rank = 8
    m.lora.alpha = 16.0
    m.lora.dropout = 0.0
    c.data.doc_max_len = 128
    # 4x: 32 latents a document. At 16x the span read-out held a tenth of the answers whole
    # and the copy path had nothing to copy; at 4x the start's read-out holds 0.89 of them and
    # the copy path answers years, counts and some names (projects/demo/README.md, "The copy
    # path at 4x").
    c.data.compression_rate = 4
    c.data.chunk_overlap = 16
    c.data.question_max_len = 48
    c.data.answer_max_len = 16
    # K = 1: the demo's small generator reads one retrieved document's latents, but given five
    # it answers from its prior (projects/demo/README.md); Recall@5 is still reported.
    c.data.num_docs = 1
    c.data.paraphrase_max_len = 128
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.learning_rate = 1e-3
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    # The compressor learns to match questions to documents in stages 1-2 (without it held-out
    # Recall@5 is 0.095), and answers are swapped in the documents so that the generator
    # cannot learn the train world by heart (see projects/demo/README.md).
    c.train.lambda_retrieval = 1.0
    # The latent channel, from random init (bench/channel.py, 32 tokens through 8 latents):
    # a latent slot takes the RoPE positions of the text it stands for, so the generator finds
    # latent j and its sub-position r by relative offset, and the span read-out loss gives the
    # compressor a signal before the generator reads anything (projects/channel/README.md).
    c.model.latent_positions = "spread"
    c.train.span_weight = 1.0
    # The generator copies answer tokens out of the latents' span read-outs (pointer-generator
    # style, the pointer matching by position, token and the token before), the read-outs
    # written by a learned head and a linear write beside the memory tokens; the pointer has
    # its own loss while the gate is shut (projects/demo/README.md, "The copy path at 4x").
    c.model.span_head = True
    c.model.chunk_write = True
    c.model.latent_copy = True
    c.model.copy_content = True
    c.train.pointer_weight = 1.0
    c.demo.swap_answers = 1.0
    # A quarter of the stage-2/3 examples give the documents as text, so that the evaluation's
    # text-RAG baseline reads a generator that has read text (issue 22).
    c.data.text_share = 0.25
    # A medium train world (1,990 documents) for a retriever that generalises (held-out
    # Recall@5 0.89 against 0.43 with the small one), evaluated on the small held-out world.
    c.demo.world_size = "medium/small"
    # Stage 1 starts from a model pretrained on generated worlds (none of them the demo's),
    # projects/demo/start (projects/demo/README.md, "The pretrained start"); from
    # scratch, even with a language-model warm-up, the generator learnt the train world by
    # heart and never read its latents.
    c.demo.pretrained = "projects/demo/start"
    c.demo.stage_steps = (120, 60, 30)
    c.demo.stage_lr = (1e-3, 5e-4, 1e-4)
    if arg == "16x":
        # The demo as projects/demo/start_16x was made: 8 latents a document, no copy path
        # (bench/channel.py's M = 8 measurements run on it).
        c.data.compression_rate = 16
        m.vocab_size = 2048
        m.span_head = m.chunk_write = m.latent_copy = m.copy_content = False
        c.train.pointer_weight = 0.0
        c.demo.pretrained = "projects/demo/start_16x"
    elif arg:
        raise ValueError(f"configs/demo.py takes no argument but '16x', got {arg!r}")
    return finalize(c)
