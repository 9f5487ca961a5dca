"""A training run whose workdir is a gs:// URL: checkpoints (orbax through tensorstore's GCS
driver), metrics.jsonl, eval_metrics.jsonl, TensorBoard event files, the pinned tokenizer and
the workdir lock all land in the bucket, nothing in a local `./gs:` directory; the run
resumes from the bucket to the losses of a local run, and a corrupt step there is moved aside.
The bucket is `tests/fake_gcs`: a GCS JSON API server and fsspec filesystem over one local
directory, reached by the same routes as a real bucket."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests import eval_support as es
from tests import fake_gcs

RUN = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """ROOT with ROOT/bucket as gs://bucket; the test runs in an empty working directory, so
    anything written relative to it (`./gs:/bucket/run`) shows."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs.serve(tmp_path / "gcs") as root:
        yield root
    assert not any(cwd.iterdir()), sorted(cwd.rglob("*"))


def _config(steps, profile_steps=0):
    config = es.fresh_config()
    config.train.steps = steps
    config.train.profile_steps = profile_steps
    config.train.checkpoint_every = 1
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.eval_batches = 1
    config.train.keep_checkpoints = 2
    # A learning rate that does not depend on train.steps, so that runs of 2, 4 and 5 steps
    # agree step by step.
    config.train.schedule = "constant"
    config.train.warmup_frac = 0.0
    return config


def _train(workdir, steps, tokenizer_dir=None, profile_steps=0):
    from clara_jax.train.loop import train
    from tests.train_support import SyntheticLoader

    def factory(c, stage, split):
        return SyntheticLoader(c, stage, seed=0 if split == "train" else 1)

    return train(_config(steps, profile_steps), workdir, factory, progress=False,
                 tokenizer_dir=tokenizer_dir)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _event_tags(directory: Path) -> set[str]:
    """The scalar tags in the TFRecord-framed event files under `directory` (each record:
    u64 length, u32 crc, payload, u32 crc); a cut-off file fails the framing."""
    tags = set()
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for f in files:
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            payload = data[pos + 12:pos + 12 + n]
            assert len(payload) == n and pos + 16 + n <= len(data), f"{f}: cut off"
            tags.update(t for t in ("train/loss", "eval/loss") if t.encode() in payload)
            pos += 16 + n
    return tags


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from clara_jax.data.prepare import world_tokenizer

    out = tmp_path_factory.mktemp("tok")
    world_tokenizer(es.fresh_config()).save(out)
    return out


def test_run_on_gs_writes_everything_to_the_bucket_and_resumes(bucket, tmp_path, tokenizer_dir,
                                                               capfd):
    local = tmp_path / "local"
    reference = _train(local, 4)
    assert reference.status == "done"
    capfd.readouterr()

    result = _train(RUN, 2, tokenizer_dir)
    assert result.status == "done" and result.step == 2
    assert result.checkpoint == f"{RUN}/checkpoints"
    run = bucket / "bucket" / "run"
    for step in (1, 2):
        # commit_success.txt: orbax took its object-storage route (no rename) for this step
        assert (run / "checkpoints" / str(step) / "commit_success.txt").is_file()
        assert (run / "checkpoints" / str(step) / "clara_manifest.json").is_file()
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in _rows(run / "eval_metrics.jsonl")] == [2]
    assert _event_tags(run / "tb") == {"train/loss", "eval/loss"}
    assert (run / "tokenizer" / "clara_tokenizer.json").is_file()
    assert not (run / ".clara.lock").exists()  # the lease is given back at the end

    # Resumed from the bucket: the losses of the uninterrupted local run, exactly; older
    # steps removed by keep_checkpoints=2 (orbax's deletion on GCS).
    result = _train(RUN, 4, tokenizer_dir)
    assert f"resumed from {RUN}/checkpoints/2" in capfd.readouterr().out
    assert result.step == 4
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [3, 4]
    losses = [(r["step"], r["loss"]) for r in _rows(run / "metrics.jsonl")]
    assert losses == [(r["step"], r["loss"]) for r in _rows(local / "metrics.jsonl")]
    assert [r["step"] for r in _rows(run / "eval_metrics.jsonl")] == [2, 4]

    # `clara ask` / `clara eval` read the run from the bucket: the local run's params, exactly.
    import jax
    import numpy as np

    from clara_jax.infer.serving import load_checkpoint_model

    remote, here = load_checkpoint_model(RUN), load_checkpoint_model(local, tokenizer_dir)
    assert remote.step == here.step == 4
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                     remote.params, here.params))
    assert remote.tokenizer.vocab_size == here.tokenizer.vocab_size

    # A damaged step in the bucket is reported, moved aside, and the previous one resumed.
    state = run / "checkpoints" / "4" / "state"
    victim = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(bytes(b ^ 0xFF for b in victim.read_bytes()))
    result = _train(RUN, 5, tokenizer_dir)
    captured = capfd.readouterr()
    assert "step 4 is corrupt or partial" in captured.err
    assert f"resumed from {RUN}/checkpoints/3" in captured.out
    assert (run / "corrupt_checkpoints" / "4" / "clara_manifest.json").is_file()
    assert result.step == 5 and [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3,
                                                                                       4, 5]


def test_workdir_lease_on_gs_refuses_a_live_holder_and_takes_over_a_dead_one(bucket,
                                                                             monkeypatch,
                                                                             capfd):
    from clara_jax import workdir

    monkeypatch.setattr(workdir, "LEASE_BEAT_S", 0.2)
    monkeypatch.setattr(workdir, "LEASE_S", 1.5)
    marker = bucket / "bucket" / "held" / workdir.LOCK_FILE
    with workdir.lock("gs://bucket/held", "clara train (first)"):
        assert json.loads(marker.read_text())["command"] == "clara train (first)"
        with pytest.raises(workdir.LockError, match=r"gs://bucket/held: in use by clara "
                                                    r"train \(first\) \(PID \d+"):
            with workdir.lock("gs://bucket/held", "clara train (second)"):
                pass
    assert not marker.exists()

    # A killed holder's record: its heartbeat never moves, so the lease is taken over.
    marker.write_text(json.dumps({"pid": 1, "host": "gone", "command": "clara train (dead)",
                                  "since": "then", "token": "t", "beat": 7}))
    with workdir.lock("gs://bucket/held", "clara train (third)"):
        assert json.loads(marker.read_text())["command"] == "clara train (third)"
    assert "taking over the lease of clara train (dead)" in capfd.readouterr().err


def test_url_workdirs_orbax_cannot_write_are_refused_in_one_line(bucket):
    from clara_jax.fileio import as_path
    from clara_jax.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"^--workdir=s3://bucket/run: orbax checkpoints "
                                              r"go to a local path or gs://bucket/\.\.\. only$"):
        _train("s3://bucket/run", 1)
    with pytest.raises(ValueError, match=r"^nowhere://x: unsupported URL scheme"):
        as_path("nowhere://x")


def test_profiler_trace_on_gs_lands_in_the_bucket(bucket, tokenizer_dir, capfd):
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("clara_profile_*"))
    result = _train("gs://bucket/prof", 3, tokenizer_dir, profile_steps=1)
    assert result.status == "done"
    assert "profiler: traced steps 2-2 into gs://bucket/prof/tb/plugins/profile" in \
        capfd.readouterr().out
    traces = list((bucket / "bucket" / "prof" / "tb" / "plugins" / "profile").glob(
        "*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(traces[0]))
    steps = {int(dict(e.stats)["step_num"]) for plane in data.planes for line in plane.lines
             for e in line.events if e.name == "train"}
    assert steps == {2}
    # the local staging directory is gone once uploaded
    assert set(Path(tempfile.gettempdir()).glob("clara_profile_*")) == before
