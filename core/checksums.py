"""File checksums: what the model bundle's manifest and the index metadata record."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

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


# What the child process of ``sha256_files`` runs: stdlib only (it imports nothing of ours),
# at a lower CPU priority than the server it hashes for.
_CHILD = """
import hashlib, os, sys
try:
    os.nice(10)
except OSError:
    pass
buffer = bytearray(1 << 24)
view = memoryview(buffer)
for path in sys.argv[1:]:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    print(digest.hexdigest())
"""


def sha256_files(paths: Sequence[Path], *, timeout: float = 600.0) -> list[str]:
    """``sha256_file`` of each path, computed in a child process.

    A serving worker verifies a new bundle (hundreds of MB) beside its traffic: hashed in
    the worker, every read and every hashing step takes the GIL back from the request
    thread. A child process (the interpreter's own, stdlib only, at nice 10) leaves the
    worker's GIL alone. When the child cannot run or answers wrongly, the files are hashed
    here instead (logged).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(path)
    if not paths:
        return []
    try:
        done = subprocess.run([sys.executable, "-S", "-I", "-c", _CHILD, *map(str, paths)],
                              capture_output=True, text=True, timeout=timeout, check=True)
        digests = done.stdout.split()
        if len(digests) == len(paths) and all(len(d) == 64 for d in digests):
            return digests
        reason = f"{len(digests)} digests for {len(paths)} files"
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("hashing %d files in a child process failed (%s): hashing them here",
                len(paths), reason[:200])
    return [sha256_file(p) for p in paths]
