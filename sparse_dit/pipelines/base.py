"""The declarative description of a model family that `patch` needs, and how it is looked up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparse_dit.geometry import TextPosition


class NoGridError(ValueError):
    """Raised by an adapter's ``read_call`` for an input it cannot map to a video grid: the call runs dense (counted,
    with one warning) instead of failing, as the unpatched model would accept it."""


@dataclass(frozen=True)
class CallInfo:
    """What the transformer's forward hook reads off one call."""

    batch: int
    grid: tuple[int, int, int]
    timestep: float  # normalised to [0, 1], 1 = pure noise
    # image tokens after the grid that are not part of it (Flux Kontext reference images, QwenImage's extra images):
    # attended like text (every query sees them, they see every key)
    extra_len: int = 0


@dataclass(frozen=True)
class ModelAdapter:
    """How sparse-dit finds its way around one diffusers model family.

    transformer_classes: class names of the diffusers transformers this adapter handles.
    pipeline_transformers: attributes of a pipeline that hold such transformers (each patched).
    self_attention: given the transformer, the ordered self-attention modules over video tokens.
    read_call: given the transformer and its forward's (args, kwargs), batch, post-patchify grid, timestep.
    text_position / text_len: where text tokens sit inside the self-attention sequence.
    """

    family: str
    transformer_classes: tuple[str, ...]
    pipeline_transformers: tuple[str, ...]
    self_attention: Callable[[torch.nn.Module], list[torch.nn.Module]]
    read_call: Callable[[torch.nn.Module, tuple, dict], CallInfo]
    text_position: TextPosition = "none"
    docs: str = ""

    def handles(self, model: Any) -> bool:
        return any(cls.__name__ in self.transformer_classes for cls in type(model).__mro__)


def call_argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """Forward argument ``name`` whether it was passed by keyword or at ``position``."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise ValueError(f"the transformer was called without {name!r}; sparse-dit needs it to know the video grid")


def normalised_timestep(t: Any, scale: float, reversed: bool = False) -> float:
    """First element of a scalar/1-D/2-D timestep tensor, divided by the scheduler's training range
    (``scale``), as a fraction of noise: 1 = pure noise. ``reversed`` for models whose timestep counts
    the other way (Mochi: 0 = pure noise)."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1)[0].item() if t.numel() else 0.0
    t = float(t) / scale
    return 1.0 - t if reversed else t


def grid_5d(hidden: torch.Tensor, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Post-patchify grid of latents (B, C, F, H, W) cut into patches (p_t, p_h, p_w)."""
    if hidden.dim() != 5:
        raise ValueError(f"expected video latents (B, C, F, H, W); got shape {tuple(hidden.shape)}")
    _, _, F, H, W = hidden.shape
    return (F // patch[0], H // patch[1], W // patch[2])


def blocks_attr(*paths: str) -> Callable[[torch.nn.Module], list[torch.nn.Module]]:
    """Self-attention modules at ``"<block list>.<attribute>"`` paths in execution order: block lists one
    after the other, and within a block its attributes in the order given; missing (None) ones skipped."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        blocks_name, attr = path.split(".")
        groups.setdefault(blocks_name, []).append(attr)

    def modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
        out = []
        for blocks_name, attrs in groups.items():
            for block in getattr(transformer, blocks_name, None) or []:
                out += [m for m in (getattr(block, a, None) for a in attrs) if m is not None]
        return out

    return modules
