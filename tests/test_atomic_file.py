"""d3sr_core.atomic_file: the one writer behind every weight file, PNG, checkpoint and report."""

from __future__ import annotations

import os
import stat

import pytest

from d3sr_core.atomic_file import atomic_path, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_new_file_gets_the_permissions_of_a_plain_open(tmp_path):
    # mkstemp creates 0600 files; a weight file must stay readable by a ComfyUI running as another user.
    write_text_atomic(tmp_path / "sub" / "a.txt", "hello")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello"
    assert _mode(tmp_path / "sub" / "a.txt") == _mode(tmp_path / "plain.txt") == 0o666 & ~_umask()


def test_replacing_keeps_the_files_mode(tmp_path):
    target = tmp_path / "w.safetensors"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("precious")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


@pytest.mark.parametrize("durable", [True, False])
def test_fsync_unless_told_the_file_is_made_again_anyway(tmp_path, monkeypatch, durable):
    # durable=False (generated test models): still atomic, without the fsync (1.9 s for 1.6 GB).
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with atomic_path(tmp_path / "m.bin", durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"weights")
    assert (tmp_path / "m.bin").read_bytes() == b"weights" and os.listdir(tmp_path) == ["m.bin"]
    assert len(synced) == (1 if durable else 0)
