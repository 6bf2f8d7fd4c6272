"""Make ``sparse_dit`` importable on a machine where it is not installed,
such as a fresh GPU machine: a temporary ``sparse_dit/`` that links to this checkout's files."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_sparse_dit() -> None:
    try:
        import sparse_dit.kernels  # noqa: F401
        import sparse_dit.patterns  # noqa: F401

        return
    except ImportError:
        pass
    root = Path(tempfile.mkdtemp(prefix="sparse_dit_"))
    pkg = root / "sparse_dit"
    pkg.mkdir()
    for entry in (REPO / "sparse_dit").iterdir():
        (pkg / entry.name).symlink_to(entry)
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "sparse_dit" or m.startswith("sparse_dit.")]:
        del sys.modules[name]
