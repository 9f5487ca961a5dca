"""Config files, derived fields, command-line overrides and validation errors."""

from __future__ import annotations

import json

import pytest

from clara_jax.config import ConfigError, base_config, finalize, saved_config
from configs import demo, mistral_7b, tiny
from tests import eval_support as es
from tests.conftest import REPO


@pytest.mark.parametrize("module", [tiny, demo, mistral_7b])
def test_configs_finalize_with_memory_tokens(module):
    c = module.get_config()
    assert c.model.num_memory_tokens == c.data.doc_max_len // c.data.compression_rate


@pytest.mark.parametrize("rate,m", [(4, 64), (16, 16), (32, 8), (64, 4), (128, 2), (256, 1)])
def test_mistral_compression_argument_sets_memory_tokens(rate, m):
    assert mistral_7b.get_config(f"compression={rate}").model.num_memory_tokens == m


def test_mistral_rejects_unknown_argument():
    with pytest.raises(ValueError, match="compression=N"):
        mistral_7b.get_config("ratio=4")


def _bad(mutate) -> str:
    c = base_config()
    mutate(c)
    with pytest.raises(ConfigError) as err:
        finalize(c)
    return str(err.value)


@pytest.mark.parametrize("mutate,field", [
    (lambda c: setattr(c.data, "doc_max_len", 250), "config.data.doc_max_len=250"),
    (lambda c: setattr(c.data, "text_share", -0.1), "config.data.text_share=-0.1"),
    (lambda c: setattr(c.data, "text_share", 1.5), "config.data.text_share=1.5"),
    (lambda c: setattr(c.data, "paraphrase_max_len", 1), "config.data.paraphrase_max_len=1"),
    (lambda c: setattr(c.data, "stage_doc_chunks", "first"), "config.data.stage_doc_chunks="),
    # 128 - 3 framing tokens leave a 125-token room: an overlap of 125 cannot chunk.
    (lambda c: (setattr(c.data, "doc_max_len", 128), setattr(c.data, "chunk_overlap", 125)),
     "config.data.chunk_overlap=125"),
    (lambda c: setattr(c.train, "lambda_retrieval", -1.0), "config.train.lambda_retrieval=-1.0"),
    (lambda c: setattr(c.data, "compression_rate", 0), "config.data.compression_rate=0"),
    (lambda c: setattr(c.model, "n_kv_heads", 5), "config.model.n_kv_heads=5"),
    (lambda c: setattr(c.model, "head_dim", 127), "config.model.head_dim=127"),
    (lambda c: setattr(c.model, "latent_dim", 5000), "config.model.latent_dim=5000"),
    (lambda c: setattr(c.model, "remat", "some"), "config.model.remat='some'"),
    (lambda c: setattr(c.model, "span_code", -0.02), "config.model.span_code=-0.02"),
    (lambda c: setattr(c.model, "latent_copy", True), "config.model.latent_copy=True"),
    (lambda c: setattr(c.model, "dtype", "float16"), "config.model.dtype='float16'"),
    (lambda c: setattr(c.model.lora, "targets", ("q", "qkv")), "config.model.lora.targets"),
    (lambda c: setattr(c.model.lora, "adapters", ("compressor",)), "config.model.lora.adapters"),
    (lambda c: setattr(c.model.lora, "dropout", 1.5), "config.model.lora.dropout=1.5"),
    (lambda c: setattr(c.data, "num_docs", 30), "config.data.num_docs=30"),
    (lambda c: setattr(c.train, "stage", 4), "config.train.stage=4"),
    (lambda c: setattr(c.train, "profile_steps", -2), "config.train.profile_steps=-2"),
    (lambda c: setattr(c.train, "schedule", "linear"), "config.train.schedule='linear'"),
    (lambda c: (setattr(c.mesh, "fsdp", -1)), "config.mesh.fsdp=-1"),
    (lambda c: setattr(c.mesh, "tensor", 0), "config.mesh.tensor=0"),
])
def test_validation_names_the_bad_field(mutate, field):
    assert field in _bad(mutate)


def test_world_sizes_config_checks_are_the_worlds_data_builds():
    # config.py holds the world-size names for demo.world_size's check (config sits left of
    # data); the world generator must know exactly those sizes, and no others.
    from clara_jax.config import WORLD_SIZE_NAMES, WORLD_SIZES
    from clara_jax.data import world

    assert tuple(world.SIZES) == WORLD_SIZE_NAMES
    assert world.split_sizes("medium/small") == {"train": "medium", "heldout": "small"}
    assert "medium/small" in WORLD_SIZES and world.WORLD_SIZES is WORLD_SIZES


def test_divisibility_message_names_both_fields():
    msg = _bad(lambda c: setattr(c.data, "doc_max_len", 250))
    assert "data.compression_rate=16" in msg


def _clara(*args, check=True):
    res = es.clara(*args)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_cli_override_recomputes_memory_tokens_and_counts_mistral_params():
    out = _clara("info", "--config=configs/mistral_7b.py:compression=128",
                 "--config.model.lora.rank=8")
    info = json.loads(out.stdout)
    assert info["num_memory_tokens"] == 2
    assert info["params"]["adapter:compressor"] == 41_943_040 // 2
    out = _clara("info", "--config=configs/tiny.py", "--config.data.compression_rate=4")
    assert json.loads(out.stdout)["num_memory_tokens"] == 32 // 4


def test_cli_override_is_validated():
    out = _clara("info", "--config=configs/tiny.py", "--config.data.compression_rate=5",
                 check=False)
    assert out.returncode != 0
    assert "config.data.doc_max_len=32" in out.stderr


def test_cli_unknown_command_and_usage():
    out = _clara("nope", check=False)
    assert out.returncode == 2 and "unknown command 'nope'" in out.stderr
    assert "info" in _clara("--help").stdout
    help_text = _clara("info", "--help").stdout
    assert "usage: clara info" in help_text and "--config:" in help_text
    assert "--coordinator_address:" in help_text


def test_saved_config_fills_fields_added_since_and_keeps_the_rest():
    saved = tiny.get_config().to_dict()
    del saved["data"]["paraphrase_max_len"], saved["train"]["lambda_retrieval"]
    saved["data"]["answer_max_len"] = 7
    restored = saved_config(json.loads(json.dumps(saved)))
    assert restored.data.paraphrase_max_len == base_config().data.paraphrase_max_len
    assert restored.train.lambda_retrieval == base_config().train.lambda_retrieval
    assert restored.data.answer_max_len == 7  # saved values win
    assert restored.model.num_memory_tokens == tiny.get_config().model.num_memory_tokens


def test_file_overrides_cast_tuples_item_by_item():
    from clara_jax.config import load_config_file

    c = load_config_file(str(REPO / "configs" / "demo.py"),
                         ["demo.stage_steps=10,20,30", "demo.stage_lr=(1e-3, 1e-4, 1e-5)",
                          "model.lora.targets=q,v", "train.span_weight=0.5"])
    assert tuple(c.demo.stage_steps) == (10, 20, 30)
    assert tuple(c.demo.stage_lr) == (1e-3, 1e-4, 1e-5)
    assert tuple(c.model.lora.targets) == ("q", "v")
    assert c.train.span_weight == 0.5
