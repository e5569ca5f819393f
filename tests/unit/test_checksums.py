"""core.checksums.sha256_file: the file's SHA-256 whatever its size against the read step."""

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
