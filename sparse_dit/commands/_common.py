"""What the subcommands share: user errors, argument checks, profile look-up, device/backend checks and
progress bars. Everything here runs before a model is built, except `step_progress`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sparse_dit.profile import resolve_profile_path as resolve_shipped_or_file
from sparse_dit.profile import shipped_profile_names


class UsageError(Exception):
    """A mistake in what the user asked for. The CLI prints its message as one line and exits with code 2;
    the message says what to change."""


def require(condition: bool, message: str) -> None:
    """Raise `UsageError(message)` unless ``condition`` holds."""
    if not condition:
        raise UsageError(message)


def check_positive(args: argparse.Namespace, *options: str) -> None:
    """Every named option that is set must be >= 1 (option names as on the command line, e.g. ``--steps``)."""
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if value is not None:
            require(value >= 1, f"{option} must be at least 1; got {value}")


def check_non_negative(args: argparse.Namespace, *options: str) -> None:
    """Every named option that is set must be >= 0."""
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if value is not None:
            require(value >= 0, f"{option} must be 0 or more; got {value}")


def check_fraction(value: float | None, option: str, *, low_open: bool = True, high: float = 1.0) -> None:
    """``value`` (when set) must lie in (0, high] (``low_open``) or [0, high)."""
    if value is None:
        return
    ok = (0.0 < value <= high) if low_open else (0.0 <= value < high)
    interval = f"(0, {high:g}]" if low_open else f"[0, {high:g})"
    require(math.isfinite(value) and ok, f"{option} must be in {interval}; got {value:g}")


def check_block_size(block_size: int | None, option: str = "--block-size") -> None:
    """Block sizes are at least 16 tokens (what `sparse_dit.patch` and the kernels accept)."""
    if block_size is not None:
        require(block_size >= 16, f"{option} must be at least 16 tokens; got {block_size}")


def check_window(window: Sequence[int] | None, option: str = "--window") -> None:
    """A window is one int or three (frames, rows, columns), none negative."""
    if window is None:
        return
    require(len(window) in (1, 3), f"{option} takes one int or three (t h w); got {len(window)} values")
    require(all(w >= 0 for w in window), f"{option} values must be 0 or more; got {' '.join(map(str, window))}")


# ------------------------------------------------------------------------------------ device and backend
def resolve_device(name: str | None) -> torch.device:
    """The device the user named (default: cuda when a GPU is visible, else cpu), checked to exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu or cuda") from None
    require(device.type in ("cpu", "cuda"), f"--device {name!r} is not supported; use cpu or cuda")
    if device.type == "cuda":
        require(torch.cuda.is_available(), "--device cuda: no CUDA GPU is visible to torch; use --device cpu "
                "(or install a CUDA build of torch on a GPU machine)")
        if device.index is not None:
            require(device.index < torch.cuda.device_count(),
                    f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


BACKEND_CHOICES = ("auto", "triton", "gluon", "fa4", "reference")
BACKEND_HELP = ("auto: on a supported GPU the fastest by measurement of the Triton kernel and, where they can run, the "
                "Gluon (Hopper, Triton 3.6) and FlashAttention-4 engines; else the PyTorch reference. triton, gluon, "
                "fa4: that engine (Gluon and FA4 for layouts of whole 128-key blocks, Triton for the rest)")


def check_backend(backend: str, device: torch.device) -> str:
    """The attention backend that will actually run for ``backend`` on ``device``, as a phrase for output.
    A GPU backend (``triton``, ``gluon``, ``fa4``) without a CUDA GPU, without the triton package, or without what
    its engine needs is a user error, reported before any work."""
    if backend in ("triton", "gluon", "fa4"):
        require(device.type == "cuda", f"--backend {backend} needs a CUDA GPU; use --backend auto or reference on a CPU")
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UsageError(f"--backend {backend} needs the triton package (pip install triton); "
                             "or use --backend reference") from None
    if backend == "gluon":
        from sparse_dit.kernels.gluon_attention import gluon_available, gluon_import_error

        require(gluon_available(), "--backend gluon needs a Hopper GPU (compute capability 9.0) and Triton 3.6 "
                f"({gluon_import_error() or 'this GPU is not Hopper'}); use --backend auto")
        return "Gluon engine where it can run the layout, else the Triton kernel"
    if backend == "fa4":
        from sparse_dit.kernels.fa4 import fa4_available

        require(fa4_available(), "--backend fa4 needs FlashAttention-4 (pip install 'sparse-dit[fa4]'); "
                "use --backend auto")
        return "FA4 engine where it can run the layout, else the Triton kernel"
    if backend == "reference" or device.type != "cuda":
        return "PyTorch reference backend"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "PyTorch reference backend (triton is not installed)"
    return "Triton kernel" if backend == "triton" else "fastest measured of the Triton kernel and the installed engines"


# ---------------------------------------------------------------------------------------------- profiles
def resolve_profile_path(value: str) -> Path:
    """The file a ``--profile`` value names (`sparse_dit.profile.resolve_profile_path`), as a CLI error."""
    try:
        return resolve_shipped_or_file(value)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err).replace("the profile argument", "--profile")) from None


def load_profile_arg(value: str):
    """Load the profile a ``--profile`` value names (see `resolve_profile_path`), without echoing the file's
    contents in errors: a file that is not a profile is reported by name and reason only."""
    from sparse_dit.profile import FORMAT, Profile

    path = resolve_profile_path(value)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a sparse-dit profile (not a text file)") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not a sparse-dit profile (invalid JSON at line {err.lineno}, "
                         f"column {err.colno}); write one with `sparse-dit profile`") from None
    except OSError as err:
        raise UsageError(f"cannot read profile {path}: {err.strerror}") from None
    require(isinstance(doc, dict) and doc.get("format") == FORMAT,
            f"{path} is not a sparse-dit profile (it has no \"format\": \"{FORMAT}\" field); "
            f"write one with `sparse-dit profile`")
    try:
        return Profile.from_json(doc, source=str(path))
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        what = f"missing field {err}" if isinstance(err, KeyError) else "malformed plan or header"
        raise UsageError(f"{path} is a damaged sparse-dit profile ({what}); write it again with `sparse-dit profile`") from None


def check_profile_fits(profile: Any, *, model_class: str, layers: int, heads: int, grid: tuple[int, int, int],
                       block_size: int, batch: int = 1, head_dim: int = 64, what: str = "this run") -> None:
    """Refuse, before any work, a profile whose model (class, layers, heads) or patterns do not fit the
    requested model and video grid: every static pattern is built for the grid and every dynamic
    pattern's parameters are checked against it, with the block size that will run."""
    from sparse_dit.geometry import Geometry

    problems = []
    header = profile.header
    if header.get("model_class") and header["model_class"] != model_class:
        problems.append(f"model class {header['model_class']}, not {model_class}")
    if profile.layers != layers:
        problems.append(f"{profile.layers} layers, not {layers}")
    if profile.heads != heads:
        problems.append(f"{profile.heads} heads, not {heads}")
    if problems:
        raise UsageError(f"the profile does not fit the model ({'; '.join(problems)}); "
                         f"profile this model with `sparse-dit profile`")
    geometry = Geometry(batch, heads, head_dim, *grid)
    specs = {choice.spec for bucket in profile.plan for layer in bucket for choice in layer}
    for spec in sorted(specs, key=repr):
        try:
            if spec.static:
                spec.module.build(geometry, 1, block_size, "cpu", **spec.params)
            else:
                spec.module.check_params(geometry, **spec.params)
        except ValueError as err:
            calibrated = header.get("calibration", {}).get("grid")
            at = f" (calibrated on grid {'x'.join(map(str, calibrated))})" if calibrated else ""
            raise UsageError(f"the profile does not fit {what}, grid {'x'.join(map(str, grid))} with block "
                             f"{block_size}{at}: {err}") from None


# ---------------------------------------------------------------------------------------------- progress
@contextlib.contextmanager
def step_progress(module: torch.nn.Module, total: int, desc: str, unit: str = "step", initial: int = 0,
                  disable: bool = False) -> Iterator[Any]:
    """A tqdm bar (with rate and ETA) that moves by one at every forward call of ``module``: one
    denoising step of a model that batches its CFG passes. ``initial``: steps already done (a resumed run;
    the rate counts only new steps). Yields the bar; the hook is removed on exit."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=disable, leave=True)
    def tick(*_: Any) -> None:  # a forward hook must return None, or it replaces the module's output
        bar.update(1)

    handle = module.register_forward_hook(tick)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


def debug_enabled() -> bool:
    """True when SPARSE_DIT_DEBUG is set to a non-empty value other than 0 (tracebacks for user errors)."""
    return os.environ.get("SPARSE_DIT_DEBUG", "") not in ("", "0")


__all__ = [
    "UsageError",
    "check_backend",
    "check_block_size",
    "check_fraction",
    "check_non_negative",
    "check_positive",
    "check_profile_fits",
    "check_window",
    "debug_enabled",
    "load_profile_arg",
    "require",
    "resolve_device",
    "resolve_profile_path",
    "shipped_profile_names",
    "step_progress",
]
