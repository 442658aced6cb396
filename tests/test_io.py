"""Atomic files and folders (lyra/utils/io.py): complete or untouched, never half-written."""

from __future__ import annotations

import json

import pytest

from lyra.utils.io import atomic_directory, atomic_file, atomic_write_json, atomic_write_text, move_into


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]
    atomic_write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    with atomic_file(tmp_path / "shared.bin", mode=0o644) as temporary:
        temporary.write_bytes(b"x")
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == 0o644


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("crash while saving")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_directory(target) as staging:
        (staging / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]  # the old files went with the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no staging or old folder left


def test_move_into_keeps_other_entries(tmp_path):
    (tmp_path / "dst" / "keep").mkdir(parents=True)
    (tmp_path / "dst" / "sub").mkdir()
    (tmp_path / "dst" / "sub" / "stale").write_text("x")
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "fresh").write_text("y")
    (tmp_path / "src" / "file").write_text("z")
    move_into(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["file", "keep", "sub"]
    assert [p.name for p in (tmp_path / "dst" / "sub").iterdir()] == ["fresh"]
    assert not (tmp_path / "src").exists()
