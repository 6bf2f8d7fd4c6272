"""Writing result files so that a failed or interrupted write never destroys the previous file.

Every file sparse-dit's commands produce (videos, profiles, plots, reports) is written to a temporary
file in the destination's own folder and then moved over the destination with `os.replace`, which is
atomic on one file system: a reader sees either the old file or the complete new one, never a
truncated mix. The temporary file is in the same folder (not /tmp) because a move across file systems
is a copy, which is not atomic.

    from sparse_dit.io import atomic_path, write_text_atomic

    with atomic_path("clip.mp4") as tmp:      # write to tmp; moved into place only if the block succeeds
        write_video(tmp, frames)
    write_text_atomic("report.md", text)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike", min_bytes: int = 1) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block finishes, move it over ``path``.

    If the block raises (or is interrupted by Ctrl-C), or leaves fewer than ``min_bytes`` bytes in the
    temporary file, the temporary file is removed and ``path`` is left as it was. The temporary name keeps
    the destination's suffix, because writers such as imageio and matplotlib pick the format from it.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist; create it or choose another output path")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=folder)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        size = tmp.stat().st_size if tmp.exists() else 0
        if size < min_bytes:
            raise OSError(f"writing {path} produced {size} bytes; the previous file (if any) is kept")
        # mkstemp creates files readable by the owner only; give the result the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: "str | os.PathLike", text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through `atomic_path`; returns ``path``."""
    path = Path(path)
    with atomic_path(path, min_bytes=0) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def check_output_path(path: "str | os.PathLike", force: bool | None = None) -> Path:
    """Check, before any work, that ``path`` can be written: its folder exists, it is not a folder, and an
    existing file is only replaced when ``force`` is True (``force=None``: replacing is allowed, the caller
    says so when it happens). Raises FileNotFoundError / FileExistsError / IsADirectoryError naming the fix.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {str(folder)!r} does not exist; create it (mkdir -p {folder}) first")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; give a file name")
    if path.exists() and force is False:
        raise FileExistsError(f"{str(path)!r} exists; pass --force to replace it")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write into folder {str(folder)!r}; choose another output path")
    return path


__all__ = ["atomic_path", "check_output_path", "write_text_atomic"]
