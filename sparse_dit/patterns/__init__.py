"""Sparsity patterns: each module turns (geometry, parameters) into a `Layout` for a group of heads.

A pattern module defines ``NAME``, ``STATIC`` (True when the layout depends only on geometry and
parameters, so it can be cached), ``check_params(geometry, **params) -> dict`` that normalises
parameters and raises a clear ``ValueError`` for bad ones, and
``build(geometry, num_heads, block_q, device, **params) -> Layout``. Dynamic patterns also take
``q``, ``k`` (B, S, h, D) of their heads and ``state`` (a dict kept per layer and head group).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Mapping

import torch

from . import dense, kmeans, local, mask, prune, radial, tile

_REGISTRY: dict[str, ModuleType] = {m.NAME: m for m in (dense, mask, local, tile, radial, kmeans, prune)}


def register(module: ModuleType) -> None:
    """Add a pattern module to the registry (used by the pattern modules that live beside this file)."""
    _REGISTRY[module.NAME] = module


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ModuleType:
    """The pattern module called ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pattern {name!r}; known patterns: {', '.join(names())}") from None


def parameter_names(name: str) -> list[str]:
    """The parameters pattern ``name`` accepts (from its ``check_params`` signature)."""
    signature = inspect.signature(get(name).check_params)
    return [p.name for p in list(signature.parameters.values())[1:] if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def check_params(name: str, geometry: Any = None, **params: Any) -> dict:
    """Normalised parameters of pattern ``name``; an unknown parameter (a typo) is a ValueError that lists the
    parameters the pattern takes."""
    module = get(name)
    known = parameter_names(name)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(module.check_params).parameters.values())
    unknown = sorted(set(params) - set(known))
    if unknown and not accepts_any:
        takes = ", ".join(known) if known else "no parameters"
        raise ValueError(f"pattern {name!r} has no parameter {', '.join(map(repr, unknown))}; it takes: {takes}")
    return dict(module.check_params(geometry, **params))


def _freeze(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if hasattr(value, "seq_len") and hasattr(value, "kv_count"):  # a Layout
        return ("layout", id(value))
    return value


class PatternSpec:
    """One head's pattern: a registered name plus its parameters, e.g. ``PatternSpec("tile", window=(3, 3, 3))``."""

    __slots__ = ("name", "params", "_key")

    def __init__(self, name: str, **params: Any) -> None:
        self.name = name
        self.params = check_params(name, None, **params)
        self._key = (name, _freeze(self.params))

    @property
    def module(self) -> ModuleType:
        return get(self.name)

    @property
    def static(self) -> bool:
        return bool(self.module.STATIC)

    def key(self) -> tuple:
        """Hashable identity used for grouping heads and caching layouts."""
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatternSpec) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if not isinstance(v, torch.Tensor))
        return f"PatternSpec({self.name!r}{', ' + args if args else ''})"

    @classmethod
    def coerce(cls, value: "str | PatternSpec | Mapping[str, Any]") -> "PatternSpec":
        """Accept a name (``"dense"``), a spec, or a mapping ``{"name": ..., **params}``."""
        if isinstance(value, PatternSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            params = dict(value)
            name = params.pop("name", None)
            if name is None:
                raise ValueError("a pattern given as a mapping needs a 'name' key, e.g. {'name': 'tile', 'window': (3, 3, 3)}")
            return cls(name, **params)
        raise TypeError(f"pattern must be a name, a PatternSpec or a mapping; got {type(value).__name__}")


__all__ = ["PatternSpec", "check_params", "get", "names", "parameter_names", "register"]
