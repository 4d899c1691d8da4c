"""Atomic writes: a failed write keeps the old content and leaves no temporary file or folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowertune_llm.builtin.models import build_once
from flowertune_llm.shared import atomic


class BuildFailed(RuntimeError):
    """Raised by a writer halfway through, after it has written something."""


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_write_text_replaces_the_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")
    atomic.write_text(target, "new ü\n")
    assert target.read_text(encoding="utf-8") == "new ü\n"
    assert _names(tmp_path) == ["metrics.json"]


def test_write_text_that_fails_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")
    # A lone surrogate cannot be encoded: the write raises after the file was opened and staged.
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(target, "new" + "\udc80")
    assert target.read_text() == "old\n"
    assert _names(tmp_path) == ["metrics.json"]


def test_staged_file_whose_writer_raises_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(BuildFailed), atomic.staged_file(target) as temporary:
        temporary.write_bytes(b"half")
        raise BuildFailed
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["checkpoint.safetensors"]


def test_staged_folder_is_renamed_into_place(tmp_path):
    target = tmp_path / "adapter-final"
    with atomic.staged_folder(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".adapter-final.")
        (staging / "config.json").write_text("{}")
    assert _names(target) == ["config.json"]
    assert _names(tmp_path) == ["adapter-final"]


def test_staged_folder_whose_build_raises_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter-final"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(BuildFailed), atomic.staged_folder(target, replace=True) as staging:
        (staging / "new.json").write_text("half")
        raise BuildFailed
    assert _names(target) == ["old.json"] and (target / "old.json").read_text() == "old"
    assert _names(tmp_path) == ["adapter-final"]


def test_staged_folder_replaces_an_existing_folder_only_when_asked(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "theirs.json").write_text("theirs")
    with pytest.raises(OSError), atomic.staged_folder(target) as staging:
        (staging / "ours.json").write_text("ours")
    assert _names(target) == ["theirs.json"]
    with atomic.staged_folder(target, replace=True) as staging:
        (staging / "ours.json").write_text("ours")
    assert _names(target) == ["ours.json"]
    assert _names(tmp_path) == ["entry"]


def test_a_build_once_that_raises_leaves_nothing_and_the_next_one_builds(tmp_path):
    target = tmp_path / "tiny-model"

    def failing(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise BuildFailed

    with pytest.raises(BuildFailed):
        build_once(target, failing)
    assert not target.exists()
    assert _names(tmp_path) == [".tiny-model.lock"]
    assert build_once(target, lambda folder: (folder / "config.json").write_text("{}")) == target
    assert _names(target) == ["config.json"]
    assert _names(tmp_path) == [".tiny-model.lock", "tiny-model"]
