"""File checksums: what the model bundle's manifest and the index metadata record."""

from __future__ import annotations

import hashlib
from pathlib import Path

# Bytes read and hashed per step. A serving worker verifies a new bundle (hundreds of MB of
# indexes and embeddings) beside its traffic: reading and hashing release the GIL, and every
# step takes it back from the request thread, so few large steps disturb it least.
CHUNK_BYTES = 16 << 20


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read ``CHUNK_BYTES`` at a time into one buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with Path(path).open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
