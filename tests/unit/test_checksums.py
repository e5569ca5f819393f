"""core.checksums: a file's SHA-256 whatever its size against the read step, and the same
digests from a child process (or here, when the child cannot run)."""

from __future__ import annotations

import hashlib

import pytest

import core.checksums as checksums

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("size", [0, 1, 6, 7, 8, 21, 1000])
def test_sha256_file_is_hashlib_over_the_whole_file(tmp_path, monkeypatch, size: int) -> None:
    monkeypatch.setattr(checksums, "CHUNK_BYTES", 7)  # many steps, a last partial one
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 4
    path.write_bytes(data[:size])
    assert checksums.sha256_file(path) == hashlib.sha256(data[:size]).hexdigest()


def test_sha256_files_hashes_in_a_child_what_sha256_file_hashes_here(tmp_path,
                                                                      monkeypatch) -> None:
    import subprocess

    paths = []
    for i, size in enumerate([0, 5, 70_000]):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        paths.append(path)
    children = []
    real_run = subprocess.run
    monkeypatch.setattr(checksums.subprocess, "run",
                        lambda *a, **k: children.append(a) or real_run(*a, **k))
    assert checksums.sha256_files(paths) == [checksums.sha256_file(p) for p in paths]
    assert len(children) == 1  # one child for all the files
    assert checksums.sha256_files([]) == []
    with pytest.raises(FileNotFoundError):
        checksums.sha256_files([paths[0], tmp_path / "absent"])


def test_sha256_files_hashes_here_when_the_child_cannot_run(tmp_path, monkeypatch,
                                                            caplog) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"shoprec" * 1000)
    monkeypatch.setattr(checksums.sys, "executable", str(tmp_path / "no-python"))
    with caplog.at_level("WARNING", logger="core.checksums"):
        assert checksums.sha256_files([path]) == [checksums.sha256_file(path)]
    assert "hashing them here" in caplog.text
