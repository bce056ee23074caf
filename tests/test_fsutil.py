"""`atomic_directory`: the one way whole directories (adapters, checkpoints, packages, exports)
are written. A failure at any point leaves the old directory whole, never neither."""

from __future__ import annotations

from pathlib import Path

from finetune.fsutil import atomic_directory

import pytest


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_success_replaces_the_directory_whole(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(target) == {"new.txt": "new"}
    assert _leftovers(tmp_path) == []


def test_an_error_while_writing_keeps_the_old_directory(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk said no")
    assert _tree(target) == {"old.txt": "old"}
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    """The old code removed the target before renaming the staging folder in: a rename that
    failed then (a crash, EXDEV, a full directory) lost both."""
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "state.json").write_text("step 3")
    real_rename = Path.rename

    def rename(self: Path, dest: Path) -> Path:
        if self.name.endswith(".tmp"):
            raise OSError("rename failed")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(target) as staging:
        (staging / "state.json").write_text("step 4")
    assert _tree(target) == {"state.json": "step 3"}
    assert _leftovers(tmp_path) == []


def test_a_file_in_the_way_is_refused(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("a file")
    with pytest.raises(FileExistsError), atomic_directory(target):
        pass
    assert target.read_text() == "a file"
