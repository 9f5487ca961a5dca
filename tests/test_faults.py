"""The fault suite: bad inputs and damaged artifacts, each refused with one line on stderr and
nothing already written changed; a checkpoint with flipped bytes is reported, moved aside and
the previous step resumed to the same losses; a tampered bundle file is refused; one writer per
workdir; stale build directories are cleaned.

Commands run in this process through `clara_jax.cli.run` (a subprocess costs seconds of
imports per case); the model is trained once, for two steps, for the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests import eval_support as es

TINY = "--config=configs/tiny.py"


clara = es.clara_in_process


def snapshot(root: Path) -> dict:
    """Size and modification time of every file under `root` (what a refusal must not
    touch), but the writers' lock files (`clara_jax.workdir`), which say who last wrote."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".clara.lock")}


def _flip(path: Path, start: int = 64, n: int = 400) -> None:
    """Inverts `n` bytes of `path` in place (same size: only a checksum can tell)."""
    b = bytearray(path.read_bytes())
    n = min(n, len(b) - start)
    b[start:start + n] = bytes(x ^ 0xFF for x in b[start:start + n])
    path.write_bytes(bytes(b))


def _largest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _train(config, workdir, tokenizer_dir=None):
    from clara_jax.train.loop import train
    from tests.train_support import SyntheticLoader

    return train(config, workdir, lambda c, stage, split: SyntheticLoader(c, stage),
                 progress=False, tokenizer_dir=tokenizer_dir)


def _config():
    config = es.fresh_config()
    config.train.steps = 2
    config.train.checkpoint_every = 1
    config.train.log_every = 1
    return config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """root/world (JSONL files and tokenizer), root/run (a 2-step run with checkpoints 1 and 2
    and its pinned tokenizer), root/other_tok (another tokenizer), root/bundle (its export),
    and small input files."""
    from clara_jax.data.prepare import world_tokenizer
    from clara_jax.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("faults")
    config = _config()
    world = es.write_world(root, config)
    result = _train(config, root / "run", world / "tokenizer")
    assert result.status == "done" and result.step == 2
    world_tokenizer(config, seed=3).save(root / "other_tok")
    export_bundle(root / "run", root / "bundle", progress=False)
    corpus = (world / "train" / "corpus.jsonl").read_text().splitlines()
    (root / "corpus.jsonl").write_text("\n".join(corpus[:6]) + "\n")
    (root / "dup.jsonl").write_text("\n".join(corpus[:3] + corpus[1:2]) + "\n")
    (root / "bad.jsonl").write_text(corpus[0] + "\n" + '{"id": "x"}\n')
    (root / "surrogate.jsonl").write_text('{"id": "s", "text": "a\\ud800b"}\n')
    (root / "deep.jsonl").write_text("[" * 100_000 + "\n")
    (root / "latin1.jsonl").write_bytes(b'{"id": "l", "text": "caf\xe9"}\n')
    (root / "q_bad.jsonl").write_text('{"question": 1}\n')
    (root / "q_broken.jsonl").write_text('{"question": "a"\n')
    (root / "answers.jsonl").write_text("keep\n")
    (root / "evalout").mkdir()
    (root / "evalout" / "summary.json").write_text("{}\n")
    (root / "full").mkdir()
    (root / "full" / "x").write_text("keep\n")
    (root / "empty_data").mkdir()
    return root


R = "{root}"
# (command line with {root}, exit status, a piece of the one-line message)
CASES = [
    # Config validation, fields and paths (before anything is built or loaded).
    (["train", TINY, "--config.train.batch_size=0", f"--workdir={R}/new"], 2,
     "config.train.batch_size=0: must be positive"),
    (["train", TINY, "--config.train.lr=1e-3", f"--workdir={R}/new"], 2,
     "did you mean --config.train.learning_rate"),
    (["train", TINY, "--config.train.learnin_rate=1e-3", f"--workdir={R}/new"], 2,
     "no such config field"),
    (["train", TINY, "--config.modl.dim=8", f"--workdir={R}/new"], 2,
     "did you mean --config.model."),
    (["train", "--config=nope/missing.py", f"--workdir={R}/new"], 2, "no such file"),
    (["train", TINY, "--config.train.steps=abc", f"--workdir={R}/new"], 2,
     "invalid literal for int()"),
    (["train", TINY, "--config.mesh.data=3", f"--workdir={R}/new"], 2,
     "must split evenly over the mesh's batch axes"),
    (["train", TINY, "--config.train.grad_accum=3", f"--workdir={R}/new"], 2,
     "must divide train.batch_size=4"),
    (["train", TINY, "--config.model.n_kv_heads=3", f"--workdir={R}/new"], 2,
     "must divide model.n_heads=4"),
    (["train", TINY, "--config.data.doc_max_len=30", f"--workdir={R}/new"], 2,
     "multiple of data.compression_rate=8"),
    (["train", TINY, "--config.train.nan_policy=maybe", f"--workdir={R}/new"], 2,
     "must be 'stop' or 'skip'"),
    (["train", TINY, "--config.mesh.data=-1", "--config.mesh.fsdp=-1", f"--workdir={R}/new"],
     2, "only one mesh axis may be -1"),
    (["train", TINY], 2, "--workdir is required"),
    (["train", TINY, f"--workdir={R}/new"], 2, "no data: pass --data_dir"),
    (["train", TINY, f"--workdir={R}/new", f"--data_dir={R}/empty_data"], 2,
     "no tokenizer in"),
    (["train", TINY, f"--workdir={R}/new", "--bogus_flag=1"], 2,
     "Unknown command line flag 'bogus_flag'"),
    (["train", TINY, f"--workdir={R}/run", f"--data_dir={R}/other_data"], 1,
     "another one (data built with another tokenizer)"),
    # Data files and builds.
    (["data", "build", "--format=corpus", f"--input=train={R}/corpus.jsonl,train={R}/dup.jsonl",
      f"--out={R}/built", TINY], 2, "split 'train' given twice"),
    (["data", "build", "--format=corpus", f"--input={R}/dup.jsonl", f"--out={R}/built", TINY],
     1, "dup.jsonl:4: field 'id': duplicate id"),
    (["data", "build", "--format=corpus", f"--input={R}/bad.jsonl", f"--out={R}/built", TINY],
     1, "bad.jsonl:2: field 'text': missing"),
    (["data", "build", "--format=corpus", f"--input={R}/surrogate.jsonl", f"--out={R}/built",
      TINY], 1, "surrogate.jsonl:1: field 'text': lone surrogate"),
    (["data", "build", "--format=corpus", f"--input={R}/deep.jsonl", f"--out={R}/built", TINY],
     1, "deep.jsonl:1: JSON nested too deeply"),
    (["data", "build", "--format=corpus", f"--input={R}/latin1.jsonl", f"--out={R}/built",
      TINY], 1, "latin1.jsonl:1: invalid UTF-8"),
    (["data", "build", "--format=corpus", f"--input={R}/nothere.jsonl", f"--out={R}/built",
      TINY], 1, "nothere.jsonl: no such file"),
    (["data", "build", "--format=corpus", f"--input={R}/corpus.jsonl", f"--out={R}/world",
      TINY, f"--tokenizer={R}/other_tok"], 1, "holds another tokenizer"),
    (["data", "build", "--format=bogus", f"--input={R}/corpus.jsonl", f"--out={R}/built",
      TINY], 2, "value should be one of"),
    (["data", "build", "--format=corpus", f"--input={R}/corpus.jsonl", f"--out={R}/built"], 2,
     "--config is required"),
    (["data", "world", f"--out={R}/full"], 2, "exists and is not empty (pass --overwrite"),
    # Indexes.
    (["index", "build", f"--checkpoint={R}/run", f"--corpus={R}/dup.jsonl", f"--out={R}/idx"],
     2, "dup.jsonl:4: field 'id': duplicate id"),
    (["index", "build", f"--checkpoint={R}/run", f"--corpus={R}/nothere.jsonl",
      f"--out={R}/idx"], 2, "nothere.jsonl: no such file"),
    (["index", "build", f"--checkpoint={R}/run", f"--corpus={R}/corpus.jsonl",
      f"--out={R}/idx", "--num_shards=2", "--shard_index=3"], 2, "must be in [0, --num_shards"),
    (["index", "info", f"--index={R}/nothere"], 2, "nothere"),
    (["index", "build", f"--checkpoint={R}/run", f"--corpus={R}/corpus.jsonl",
      f"--out={R}/idx", "--batch_size=0"], 2, "flag --batch_size=0: must be a positive integer"),
    (["compile", TINY, "--what=generate", "--prompt_len=-3"], 2,
     "flag --prompt_len=-3: must be a positive integer"),
    # Questions, evaluations and outputs (refused before a model is loaded).
    (["ask", f"--bundle={R}/bundle", ""], 2, "question 1 is empty"),
    (["ask", f"--bundle={R}/bundle", "--num_docs=0", "q"], 2,
     "--num_docs=0: must be a positive integer"),
    (["ask", f"--bundle={R}/bundle", f"--checkpoint={R}/run", "q"], 2,
     "give --checkpoint (a training run) or --bundle"),
    (["ask", f"--bundle={R}/bundle", f"--file={R}/q_bad.jsonl"], 2,
     "q_bad.jsonl:1: field 'question': must be a non-empty string"),
    (["ask", f"--bundle={R}/bundle", f"--file={R}/q_broken.jsonl"], 2,
     "q_broken.jsonl:1: invalid JSON"),
    (["ask", f"--bundle={R}/bundle", f"--out={R}/answers.jsonl", "q"], 2,
     "answers.jsonl exists (pass --overwrite"),
    (["ask", f"--checkpoint={R}/nothere", "--mode=closed_book", "q"], 2, "no such directory"),
    (["ask", f"--bundle={R}/nothere", "q"], 2, "bundle.json: no such file"),
    (["eval", f"--bundle={R}/bundle", f"--data={R}/world", f"--out={R}/e", "--num_docs=0"], 2,
     "--num_docs=0: must be a positive integer"),
    (["eval", f"--bundle={R}/bundle", f"--data={R}/world", f"--out={R}/answers.jsonl"], 2,
     "exists and is a file"),
    (["eval", f"--bundle={R}/bundle", f"--data={R}/world", f"--out={R}/evalout"], 2,
     "summary.json exists (pass --overwrite"),
    (["eval", f"--bundle={R}/bundle", f"--data={R}/nothere.jsonl", f"--out={R}/e"], 2,
     "no such file"),
    (["export", f"--checkpoint={R}/run", f"--out={R}/full"], 2,
     "exists and is not empty (pass --overwrite)"),
    (["export", f"--out={R}/b2"], 2, "--checkpoint is required"),
    (["inspect", f"--bundle={R}/bundle"], 2, "--doc=ID is required"),
]


@pytest.fixture(scope="module")
def other_data(root):
    """A data dir whose tokenizer is not the one root/run was trained with."""
    shutil.copytree(root / "other_tok", root / "other_data" / "tokenizer")
    return root / "other_data"


@pytest.mark.parametrize("args,code,message", CASES,
                         ids=[f"{i:02d}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_changes_nothing(root, other_data, args, code, message):
    before = snapshot(root)
    rc, _, err = clara(*[a.replace(R, str(root)) for a in args])
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert snapshot(root) == before


def test_config_path_resolves_from_any_directory_and_debug_shows_the_traceback(root):
    """`--config=configs/tiny.py` from outside the repository is the package's config; with
    --debug the same error is a traceback."""
    from clara_jax.config import ConfigError

    rc, _, err = clara("train", TINY, "--config.train.steps=0", f"--workdir={root}/new",
                       cwd=root)
    assert rc == 2 and err.strip() == ("clara train: config.train.steps=0: must be positive")
    with pytest.raises(ConfigError):
        clara("train", TINY, "--config.train.steps=0", f"--workdir={root}/new", "--debug")
    assert not (root / "new").exists()


def test_one_writer_per_workdir(root):
    from clara_jax.workdir import LockError, lock

    before = snapshot(root / "run")
    with lock(root / "run", "a test"):
        rc, _, err = clara("train", TINY, f"--workdir={root}/run", f"--data_dir={root}/world")
        assert rc == 2 and "in use by a test (PID" in err and len(err.strip().splitlines()) == 1
        with pytest.raises(LockError):
            with lock(root / "run", "another"):
                pass
    with lock(root / "run", "again"):  # released when its holder ends
        pass
    assert snapshot(root / "run") == before


def test_one_writer_per_index_and_bundle(root, tmp_path):
    """`clara index build|delete` and `clara export` stop at once while another process
    writes the same index or bundle, and change nothing."""
    from clara_jax.workdir import lock, lock_output

    idx = tmp_path / "idx"
    with lock(idx, "a test"):
        rc, _, err = clara("index", "build", f"--checkpoint={root}/run",
                           f"--corpus={root}/corpus.jsonl", f"--out={idx}")
        assert rc == 2 and "in use by a test (PID" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in idx.iterdir()] == [".clara.lock"]
    rc, _, err = clara("index", "build", f"--checkpoint={root}/run",
                       f"--corpus={root}/corpus.jsonl", f"--out={idx}")
    assert rc == 0, err
    before = snapshot(idx)
    with lock(idx, "a test"):
        rc, _, err = clara("index", "delete", f"--index={idx}", "--ids=nothing")
        assert rc == 2 and "in use by a test (PID" in err
    assert snapshot(idx) == before
    with lock_output(tmp_path / "bundle", "a test"):
        rc, _, err = clara("export", f"--checkpoint={root}/run", f"--out={tmp_path}/bundle")
        assert rc == 2 and "in use by a test (PID" in err
    assert not (tmp_path / "bundle").exists()


def test_flipped_checkpoint_bytes_fall_back_to_the_previous_step(root, tmp_path, capfd):
    """400 flipped bytes in the newest step (same size): the step is reported in one line and
    moved aside, the run resumes from the step before and logs the same losses again; readers
    (ask, index, export) skip it too. With every step damaged, nothing is restored."""
    from clara_jax.infer.serving import load_checkpoint_model
    from clara_jax.train import checkpoint as ckpt

    work = tmp_path / "run"
    shutil.copytree(root / "run", work)
    want = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    _flip(_largest(work / "checkpoints" / "2" / "state"))
    capfd.readouterr()

    loaded = load_checkpoint_model(work)  # a reader: skips step 2, moves nothing
    err = capfd.readouterr().err
    assert loaded.step == 1 and "using checkpoint step 1" in err and "step 2 is corrupt" in err
    assert (work / "checkpoints" / "2").is_dir()

    result = _train(_config(), work, root / "world" / "tokenizer")
    err = capfd.readouterr().err.strip().splitlines()
    assert result.status == "done" and result.step == 2
    said = [x for x in err if "corrupt" in x]
    assert len(said) == 1 and "step 2 is corrupt" in said[0] and "using checkpoint step 1" \
        in said[0]
    assert "sha256 differs from its manifest" in said[0] and "moved to" in said[0]
    assert (work / ckpt.CORRUPT_DIR / "2").is_dir()
    got = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(got) == strip(want)  # step 2 trained again from step 1, exactly

    # A truncated file in every step: one line, no traceback, no restore.
    for step in ("1", "2"):
        f = _largest(work / "checkpoints" / step / "state")
        f.write_bytes(f.read_bytes()[:-10])
    before = snapshot(work)
    rc, _, err = clara("ask", f"--checkpoint={work}", "--mode=closed_book", "q")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no intact checkpoint" in err and "truncated or replaced" in err
    assert snapshot(work) == before


def test_bundle_files_are_verified(root, tmp_path):
    """A tampered (same size) or truncated file anywhere in a bundle, safetensors and params
    included, is refused naming it; the untouched bundle loads."""
    from clara_jax.export import bundle as B

    B.read_meta(root / "bundle")
    for name in (B.CLARA_PARAMS_FILE, "decoder/model.safetensors", "params"):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(root / "bundle", copy)
        target = copy / name if (copy / name).is_file() else _largest(copy / name)
        _flip(target)
        rc, _, err = clara("ask", f"--bundle={copy}", "--mode=closed_book", "q")
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert str(target) in err and "sha256 differs" in err
    shutil.copytree(root / "bundle", tmp_path / "cut")
    f = tmp_path / "cut" / "tokenizer" / "clara_tokenizer.json"
    f.write_text(f.read_text()[:-5])
    with pytest.raises(B.BundleError, match="clara_tokenizer.json: .*truncated or replaced"):
        B.read_meta(tmp_path / "cut")


def test_truncated_safetensors_names_the_file(root, tmp_path):
    from clara_jax.convert import hf

    shutil.copytree(root / "bundle" / "decoder", tmp_path / "dec")
    f = tmp_path / "dec" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(hf.ConversionError, match="model.safetensors: not a readable"):
        hf.load(tmp_path / "dec", progress=False)


def test_stale_build_dirs_are_cleaned_and_truncation_is_reported(root, tmp_path):
    """A killed build's `.clara_corpus.building-PID` goes on the next build; documents longer
    than data.doc_max_len are counted on stderr with the flag to raise; a second build with
    the same tokenizer is accepted."""
    out = tmp_path / "built"
    stale = out / ".clara_corpus.building-999999999"
    (stale / "x").mkdir(parents=True)
    args = ("data", "build", "--format=corpus", f"--input={root}/corpus.jsonl", f"--out={out}",
            TINY, f"--tokenizer={root}/world/tokenizer", "--noprogress")
    rc, out_text, err = clara(*args)
    assert rc == 0, err
    assert not stale.exists() and "removed 1 unfinished build directory" in err
    summary = json.loads(out_text.strip().splitlines()[-1])
    over = summary["splits"]["train"]["docs_over_doc_max_len"]
    assert over > 0
    assert (f"warning: split train: {over} of 6 documents are longer than data.doc_max_len "
            "and are split into chunks") in err and "--config.data.doc_max_len" in err
    rc, _, err = clara(*args)  # the same tokenizer again: no refusal
    assert rc == 0, err


def test_sigint_saves_a_checkpoint_like_sigterm(root, tmp_path):
    """Ctrl-C while batch 2 is fetched: the step in flight finishes, is saved (and sealed)
    and the run reports 'preempted', as with SIGTERM."""
    import signal

    from clara_jax.train import checkpoint as ckpt
    from clara_jax.train.loop import train
    from tests.train_support import SyntheticLoader

    class Interrupted(SyntheticLoader):
        def __next__(self):
            if self.index == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return super().__next__()

    config = _config()
    config.train.steps = 5
    config.train.checkpoint_every = 100
    result = train(config, tmp_path / "run", lambda c, stage, split: Interrupted(c, stage),
                   progress=False)
    assert result.status == "preempted" and result.step == 2
    assert ckpt.step_problem(tmp_path / "run" / "checkpoints" / "2", True) is None


def test_checkpoint_reads_its_own_tokenizer_from_any_directory(root, tmp_path):
    """The run keeps its data's tokenizer in WORKDIR/tokenizer: moved elsewhere and read from
    another working directory, the checkpoint still has it."""
    from clara_jax.data.tokenizer import saved_digest, tokenizer_digest
    from clara_jax.infer.serving import load_checkpoint_model

    shutil.copytree(root / "run", tmp_path / "moved")
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        loaded = load_checkpoint_model("moved")
    finally:
        os.chdir(old)
    assert tokenizer_digest(loaded.tokenizer) == saved_digest(root / "world" / "tokenizer")
