"""Model-family adapters: one small declarative description per diffusers DiT family."""

from __future__ import annotations

from typing import Any

import torch

from .base import CallInfo, ModelAdapter
from .cogvideox import COGVIDEOX
from .flux import FLUX
from .hunyuan_video import HUNYUAN_VIDEO
from .ltx import LTX_VIDEO
from .mochi import MOCHI
from .qwenimage import QWENIMAGE
from .sd3 import SD3
from .wan import WAN

ADAPTERS: tuple[ModelAdapter, ...] = (WAN, HUNYUAN_VIDEO, COGVIDEOX, LTX_VIDEO, MOCHI, FLUX, SD3, QWENIMAGE)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.transformer_classes)})" for a in ADAPTERS)


def find_adapter(model: Any) -> ModelAdapter | None:
    return next((a for a in ADAPTERS if a.handles(model)), None)


def unwrap_compiled(model: Any) -> Any:
    """The module inside a ``torch.compile(module)`` wrapper (which calls it, hooks included); else ``model``."""
    return getattr(model, "_orig_mod", model) if isinstance(model, torch.nn.Module) else model


def resolve_transformers(pipe_or_transformer: Any) -> list[tuple[torch.nn.Module, ModelAdapter]]:
    """The transformers to patch in a pipeline (or the transformer itself), each with its adapter.

    An unsupported object raises a ValueError naming the supported families.
    """
    pipe_or_transformer = unwrap_compiled(pipe_or_transformer)
    adapter = find_adapter(pipe_or_transformer)
    if adapter is not None:
        return [(pipe_or_transformer, adapter)]
    found = []
    for attr in dict.fromkeys(a for ad in ADAPTERS for a in ad.pipeline_transformers):
        model = unwrap_compiled(getattr(pipe_or_transformer, attr, None))
        if model is None:
            continue
        adapter = find_adapter(model)
        if adapter is not None:
            found.append((model, adapter))
    if not found:
        raise ValueError(
            f"sparse-dit cannot patch a {type(pipe_or_transformer).__name__}: pass a diffusers pipeline or "
            f"transformer of a supported family: {supported_families()}. To support another family, add an "
            "adapter in sparse_dit/pipelines/ (see README, 'Adding a model family')."
        )
    return found


__all__ = ["ADAPTERS", "CallInfo", "ModelAdapter", "find_adapter", "resolve_transformers", "supported_families", "unwrap_compiled"]
