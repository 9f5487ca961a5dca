"""Tokenizers: project SentencePiece training, Hugging Face tokenizer.json, specials, save/load;
prompt formats built on them."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from clara_jax.data import prompts, world
from clara_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    check_tokenizer_fits,
    load_tokenizer,
)

M = 4


@pytest.fixture(scope="module")
def corpus():
    w = world.make_world(0, "small", "train")
    return list(w.docs.values()) + [q.question for q in w.questions]


@pytest.fixture(scope="module")
def sp(corpus):
    return SentencePieceTokenizer.train(corpus, 512, M, seed=0,
                                        extra_texts=prompts.template_texts())


def _hf_file(tmp_path, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path / "hf" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_sentencepiece_is_deterministic_and_within_vocab(corpus, sp):
    again = SentencePieceTokenizer.train(corpus, 512, M, seed=0,
                                         extra_texts=prompts.template_texts())
    assert again._proto == sp._proto
    assert sp.vocab_size == 512
    assert (sp.pad_id, sp.bos_id, sp.eos_id) == (0, 2, 3)
    assert len(sp.mem_ids) == M and len(set(sp.special_ids)) == 5 + M


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_specials_never_split_and_save_load(kind, sp, corpus, tmp_path):
    tok = sp if kind == "sp" else HFTokenizer.from_file(_hf_file(tmp_path, corpus), M)
    text = "Background:\n<SEP>x<MEM3><ENC>Question: who?\nAnswer: Zuno"
    ids = tok.encode(text)
    for special in (tok.sep_id, tok.mem_ids[3], tok.enc_id):
        assert ids.count(special) == 1
    assert tok.decode(ids, skip_special=False) == text
    assert tok.decode(ids) == text.replace("<SEP>", "").replace("<MEM3>", "").replace(
        "<ENC>", "")
    plain = "Zuno was born in 1934.\nThe capital of Wefomora is Shiathadiathby."
    assert tok.decode(tok.encode(plain)) == plain
    clone = pickle.loads(pickle.dumps(tok))  # grain worker processes pickle the featurizer
    assert clone.encode(text) == ids and clone.mem_ids == tok.mem_ids
    saved = tok.save(tmp_path / "saved")
    back = load_tokenizer(saved)
    assert type(back) is type(tok)
    assert back.encode(text) == ids and back.vocab_size == tok.vocab_size
    assert (back.pad_id, back.bos_id, back.eos_id, back.mem_ids) == \
        (tok.pad_id, tok.bos_id, tok.eos_id, tok.mem_ids)


def test_hf_adds_missing_specials_after_the_vocab(corpus, tmp_path):
    path = _hf_file(tmp_path, corpus)
    base = json.loads(path.read_text())
    n = len(base["model"]["vocab"])
    tok = HFTokenizer.from_file(path, M)
    # pad, <ENC>, <SEP> and M memory tokens are new: ids n .. n+2+M.
    assert tok.vocab_size == n + 3 + M
    assert sorted([tok.pad_id, tok.enc_id, tok.sep_id, *tok.mem_ids]) == \
        list(range(n, n + 3 + M))
    assert tok.bos_id == base["model"]["vocab"]["<s>"]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_imported_checkpoint_tokenizer(name, tmp_path):
    """The convert fixtures' tokenizer.json files (toy vocabularies) take the CLaRa specials."""
    from clara_jax.data.tokenizer import load_or_import_tokenizer

    from .conftest import REPO

    path = REPO / "tests" / "fixtures" / "hf" / name
    if not (path / "tokenizer.json").exists():
        pytest.skip("convert fixtures not present")
    tok = load_or_import_tokenizer(path, M)
    ids = tok.encode("<SEP>hello<MEM1>world<ENC>")
    assert [i for i in ids if i in tok.special_ids] == [tok.sep_id, tok.mem_ids[1], tok.enc_id]
    back = load_or_import_tokenizer(tok.save(tmp_path / "t"), M)
    assert back.encode("<SEP>hello<MEM1>world<ENC>") == ids


@pytest.mark.parametrize("m", [1, 2, 7])
def test_a_sentencepiece_model_re_rated_to_other_m_keeps_every_text_id(m, sp, corpus,
                                                                        tmp_path):
    rated = sp.with_memory_tokens(m)
    assert rated.num_memory_tokens == m
    assert rated.mem_ids[:min(m, M)] == sp.mem_ids[:min(m, M)]
    # More memory tokens are appended after the vocabulary; fewer leave the ids in place.
    assert rated.vocab_size == sp.vocab_size + max(m - M, 0)
    assert rated.mem_ids[M:] == list(range(sp.vocab_size, rated.vocab_size))
    for name in ("pad_id", "bos_id", "eos_id", "enc_id", "sep_id"):
        assert getattr(rated, name) == getattr(sp, name)
    text = "\n".join(corpus[:20]) + "\nBackground: x\nQuestion: y\nAnswer: z"
    assert rated.encode(text) == sp.encode(text)
    assert rated.decode(sp.encode(corpus[0])) == sp.decode(sp.encode(corpus[0]))
    # The new memory symbols are never split; dropped ones are never produced.
    for i in rated.mem_ids:
        assert rated.encode(rated.decode([i], skip_special=False)) == [i]
    dropped = set(sp.mem_ids[m:])
    assert not dropped & set(rated.encode(text + "".join(f"<MEM{i}>" for i in range(M))))
    back = load_tokenizer(rated.save(tmp_path / "tok"))
    assert back.mem_ids == rated.mem_ids and back.vocab_size == rated.vocab_size
    with pytest.raises(TokenizerError, match="positive"):
        sp.with_memory_tokens(0)


def test_load_errors_name_the_file(tmp_path, sp):
    with pytest.raises(TokenizerError, match="clara_tokenizer.json: no such file"):
        load_tokenizer(tmp_path)
    saved = sp.save(tmp_path / "t")
    meta = json.loads((saved / "clara_tokenizer.json").read_text())
    meta["ids"]["eos"] = 99
    (saved / "clara_tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match=r"clara_tokenizer.json: field 'ids.eos'"):
        load_tokenizer(saved)


def test_tokenizer_must_fit_the_config(sp, tiny_config):
    check_tokenizer_fits(sp, tiny_config)  # 512 ids, M = 32 // 8 = 4
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.vocab_size = 256
    with pytest.raises(TokenizerError, match="config.model.vocab_size=256"):
        check_tokenizer_fits(sp, cfg)


def test_generator_example_layout(sp, tiny_config):
    k, m, t = 2, M, prompts.generator_length(tiny_config, 2)
    ex = prompts.generator_example(sp, "Where was Zuno born?", "Woutaewick", k, m, t, 24, 12)
    assert ex.tokens.shape == ex.targets.shape == ex.slot_mask.shape == (t,)
    assert ex.slot_mask.sum() == k * m and np.all(ex.tokens[ex.slot_mask] == sp.pad_id)
    n = int(ex.mask.sum())
    assert np.array_equal(ex.tokens[1:n], ex.targets[:n - 1])  # targets: shifted left by one
    assert not ex.mask[n:].any() and not ex.loss_mask[n:].any()
    answer = ex.targets[ex.loss_mask]
    assert answer[-1] == sp.eos_id and sp.decode(answer) == " Woutaewick"
    first = int(np.argmax(ex.loss_mask))  # tokens[first] is the prompt's last token
    prompt = sp.decode(ex.tokens[:first + 1], skip_special=False)
    assert prompt.startswith("<s>Background:\n<pad><pad><pad><pad><SEP><pad>")
    assert prompt.endswith("<SEP>\n\nQuestion: Where was Zuno born?\nAnswer:")
    # Inference builds the same prompt (up to the answer).
    ids, slots = prompts.inference_prompt(sp, "Where was Zuno born?", k, m, 24)
    assert len(ids) == first + 1
    assert np.array_equal(ids, ex.tokens[:len(ids)]) and np.array_equal(
        slots, ex.slot_mask[:len(ids)])
    assert not ex.question_truncated and not ex.answer_truncated
    long = prompts.generator_example(sp, "q " * 40, "a " * 40, k, m, t, 24, 12)
    assert long.question_truncated and long.answer_truncated and long.loss_mask.sum() == 12


def test_document_framing_and_text_rag(sp):
    tokens, mask, cut = prompts.encode_document(sp, "Zuno is a native of Woutaewick.", 32)
    n = int(mask.sum())
    assert (tokens[0], tokens[1], tokens[n - 1]) == (sp.enc_id, sp.bos_id, sp.eos_id)
    assert not cut and np.all(tokens[n:] == sp.pad_id)
    _, mask, cut = prompts.encode_document(sp, "word " * 100, 32)
    assert cut and mask.all()
    rag = sp.decode(prompts.text_rag_prompt(sp, "Who?", ["Doc one.", "Doc two."], 64, 24))
    assert rag == "Background:\nDoc one.\nDoc two.\n\n\nQuestion: Who?\nAnswer:"
