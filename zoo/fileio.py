"""Atomic file writes (a reader sees the old file or the new one, never half of one) and file digests.

A leaf module: it imports nothing from zoo and not torch, so the torch-free tools (``bench.serve``)
use it too.
"""
from __future__ import annotations

import hashlib
import os
import secrets

# Temporary files start with this (hidden, and recognisable as leftovers of a killed writer).
TMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically, creating its folder if needed.

    The data goes to a temporary file of a unique name in the same folder (so two writers never
    share one, and the rename stays within one file system), is fsynced, and is renamed over
    ``path`` with ``os.replace``; then the folder is fsynced so the rename survives a crash. On
    any failure the temporary file is removed and ``path`` is left as it was. The new file gets
    the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask), not
    ``tempfile.mkstemp``'s owner-only ``0o600``: other users and servers read what is written.
    """
    path = os.fspath(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = os.path.join(directory, f"{TMP_PREFIX}{secrets.token_hex(6)}-{os.path.basename(path)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and teachers are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
