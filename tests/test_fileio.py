"""Atomic writes: whole files or nothing, with the permissions a plain open() gives."""

from __future__ import annotations

import os
import stat

import pytest

from clara_jax.fileio import atomic_write, atomic_write_json, atomic_write_text


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import clara_jax.fileio as fileio

        importlib.reload(fileio)  # the mode is read from the umask at import
        fileio.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
        importlib.reload(fileio)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ok": 1})

    def fail(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == '{\n  "ok": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic_write_text(tmp_path / "new" / "dir" / "f.txt", "made")
    assert (tmp_path / "new" / "dir" / "f.txt").read_text() == "made"


class _BadFile(ValueError):
    pass


def test_read_json_names_the_file_line_and_column(tmp_path):
    from clara_jax.fileio import read_json

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}\n')
    assert read_json(good, _BadFile, "no such file") == {"a": [1, 2]}
    with pytest.raises(_BadFile, match=r"absent\.json: no such file \(hint\)"):
        read_json(tmp_path / "absent.json", _BadFile, "no such file (hint)")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(_BadFile, match=r"bad\.json:4:1: corrupted settings: invalid JSON"):
        read_json(bad, _BadFile, "missing", "settings")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(_BadFile, match=r"binary\.json: corrupted file: not UTF-8 text"):
        read_json(binary, _BadFile, "missing")
