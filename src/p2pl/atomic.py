"""Atomic file writes: a reader (or a crash) never sees a half-written result file."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write next to the target, fsync, then rename over it.

    A unique name opened with "xb" (not mkstemp, which forces mode 0600) keeps the user's umask
    permissions unless ``mode`` asks for specific ones (e.g. 0o600 for a private key).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
