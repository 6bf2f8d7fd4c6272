"""sparse-dit: per-head sparse attention for diffusers DiT pipelines.

    import sparse_dit
    sparse_dit.patch(pipe, pattern="tile")      # or profile="path/to/profile.json"
    video = pipe(prompt).frames[0]
    sparse_dit.unpatch(pipe)                    # bit-identical to never having patched
"""

from __future__ import annotations

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout
from sparse_dit.patching import is_patched, patch, patch_state, unpatch
from sparse_dit.patterns import PatternSpec

__version__ = "0.1.0"

__all__ = ["Geometry", "Layout", "PatternSpec", "is_patched", "patch", "patch_state", "profile_pipeline", "unpatch", "__version__"]


def __getattr__(name: str):
    # profile_pipeline imports the calibration machinery (and diffusers) only when it is used
    if name == "profile_pipeline":
        from sparse_dit.calibrate import profile_pipeline

        return profile_pipeline
    raise AttributeError(f"module 'sparse_dit' has no attribute {name!r}")
