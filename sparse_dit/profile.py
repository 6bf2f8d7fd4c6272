"""`Profile`: the per-(timestep bucket, layer, head) plan the profiler writes and `patch` reads.

A profile is a versioned, human-readable JSON file::

    {"format": "sparse-dit-profile", "version": 1,
     "header": {"model_class": ..., "model_id": ..., "layers": L, "heads": H, "head_dim": D,
                "calibration": {...}, "budget": {...}, "metric": ..., "dense_above": t, "buckets": [[lo, hi], ...],
                "block_size": 128, "cost_model": {...}, "library_version": ..., "created": ...},
     "summary": {...},
     "plan": [{"bucket": [lo, hi],
               "layers": [[{"pattern": "tile", "params": {...}, "error": 0.012, "density": 0.21}, ...per head], ...]}]}

Timesteps are normalised to [0, 1] (1 = pure noise); calls with ``t > dense_above`` run dense (the
warm-up), the rest look up the bucket ``lo <= t <= hi``. Buckets are keyed on the timestep, not on a
call counter, so CFG passes and step counts do not shift them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparse_dit.patterns import PatternSpec

FORMAT = "sparse-dit-profile"
VERSION = 1
def _shipped_dir() -> Path:
    import sparse_dit.profiles

    return Path(sparse_dit.profiles.__file__).resolve().parent


@dataclass(frozen=True)
class HeadChoice:
    """The pattern chosen for one head, with its measured calibration error and attention density."""

    spec: PatternSpec
    error: float
    density: float

    def to_json(self) -> dict:
        params = {k: _jsonable(v) for k, v in self.spec.params.items()}
        return {"pattern": self.spec.name, "params": params, "error": round(self.error, 6), "density": round(self.density, 6)}

    @classmethod
    def from_json(cls, d: dict) -> "HeadChoice":
        return cls(PatternSpec(d["pattern"], **d.get("params", {})), float(d.get("error", 0.0)), float(d.get("density", 1.0)))


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        raise ValueError("profiles cannot store tensor parameters (the 'mask' pattern is for experiments only)")
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _is_flat(value: Any) -> bool:
    """Scalars, lists of scalars, and dicts of those: short enough to stand on one line."""
    if isinstance(value, dict):
        return all(_is_flat(v) and not isinstance(v, dict) or _is_scalar_dict(v) for v in value.values())
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return True


def _is_scalar_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(not isinstance(v, dict) and _is_flat(v) for v in value.values())


def dumps_readable(value: Any, indent: int = 0) -> str:
    """JSON with objects and lists of objects indented, and flat values (a head's entry, a grid) inline."""
    pad, inner = " " * indent, " " * (indent + 1)
    if _is_flat(value) and (not isinstance(value, dict) or indent > 0):
        return json.dumps(value)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps_readable(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [inner + dumps_readable(v, indent + 1) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


@dataclass
class Profile:
    """header: metadata (see module docstring); buckets: [(lo, hi)]; plan[bucket][layer][head]: HeadChoice."""

    header: dict
    buckets: list[tuple[float, float]]
    plan: list[list[list[HeadChoice]]]
    summary: dict = field(default_factory=dict)

    @classmethod
    def constant(
        cls, head_plan: Sequence[PatternSpec], layers: int, *, model_class: str = "", block_size: int = 128, head_dim: int = 0
    ) -> "Profile":
        """A profile that gives every layer, at every timestep, the same per-head plan (no calibration)."""
        header = {"model_class": model_class, "layers": layers, "heads": len(head_plan), "head_dim": head_dim,
                  "block_size": block_size, "dense_above": 1.0, "budget": {}, "metric": "none (not calibrated)"}
        plan = [[[HeadChoice(spec, 0.0, float("nan")) for spec in head_plan] for _ in range(layers)]]
        return cls(header, [(0.0, 1.0)], plan)

    # --------------------------------------------------------------------------------------- queries
    @property
    def layers(self) -> int:
        return int(self.header["layers"])

    @property
    def heads(self) -> int:
        return int(self.header["heads"])

    @property
    def dense_above(self) -> float:
        return float(self.header.get("dense_above", 1.0))

    def bucket_of(self, t: float) -> int | None:
        """Index of the bucket holding normalised timestep ``t``; None in the dense warm-up."""
        if t > self.dense_above + 1e-9:
            return None
        for i, (lo, hi) in enumerate(self.buckets):
            if lo - 1e-9 <= t <= hi + 1e-9:
                return i
        # outside every bucket (e.g. a schedule that reaches lower t than calibration): nearest bucket
        return min(range(len(self.buckets)), key=lambda i: min(abs(t - self.buckets[i][0]), abs(t - self.buckets[i][1])))

    def head_plan(self, bucket: int, layer: int) -> tuple[PatternSpec, ...]:
        return tuple(c.spec for c in self.plan[bucket][layer])

    def density(self) -> float:
        """Mean attention density over buckets, layers and heads (outside the dense warm-up)."""
        values = [c.density for b in self.plan for layer in b for c in layer]
        return sum(values) / max(1, len(values))

    def pattern_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b in self.plan:
            for layer in b:
                for c in layer:
                    counts[c.spec.name] = counts.get(c.spec.name, 0) + 1
        return dict(sorted(counts.items()))

    # ------------------------------------------------------------------------------------ patching
    def check_fits(self, transformer: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> None:
        """Raise a ValueError naming every mismatch between this profile and the model."""
        problems = []
        cls = type(transformer).__name__
        if self.header.get("model_class") and self.header["model_class"] != cls:
            problems.append(f"model class: profile {self.header['model_class']}, model {cls}")
        if self.layers != len(modules):
            problems.append(f"layers: profile {self.layers}, model {len(modules)}")
        heads = getattr(modules[0], "heads", None) if modules else None
        if heads is not None and self.heads != int(heads):
            problems.append(f"heads: profile {self.heads}, model {heads}")
        if problems:
            raise ValueError(
                f"profile for {self.header.get('model_id') or self.header.get('model_class')} does not fit this model ("
                + "; ".join(problems)
                + "); profile this model with `sparse-dit profile`"
            )

    def plan_source_for(
        self, transformer: torch.nn.Module, modules: Sequence[torch.nn.Module]
    ) -> Callable[[int, float, int], tuple[PatternSpec, ...] | None]:
        self.check_fits(transformer, modules)

        def source(layer: int, t: float, step: int) -> tuple[PatternSpec, ...] | None:
            bucket = self.bucket_of(t)
            return None if bucket is None else self.head_plan(bucket, layer)

        return source

    # ------------------------------------------------------------------------------------------ I/O
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "header": {**self.header, "buckets": [list(b) for b in self.buckets]},
            "summary": self.summary or self.default_summary(),
            "plan": [
                {"bucket": list(self.buckets[i]), "layers": [[c.to_json() for c in layer] for layer in bucket]}
                for i, bucket in enumerate(self.plan)
            ],
        }

    def default_summary(self) -> dict:
        return {"density": round(self.density(), 4), "patterns": self.pattern_counts()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON: nested objects indented, each head's entry on one line."""
        path = Path(path)
        path.write_text(dumps_readable(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a sparse-dit profile (invalid JSON: {err})") from None
        return cls.from_json(doc, source=str(path))

    @classmethod
    def from_json(cls, doc: dict, source: str = "profile") -> "Profile":
        if doc.get("format") != FORMAT:
            raise ValueError(f"{source} is not a sparse-dit profile (format {doc.get('format')!r})")
        if doc.get("version") != VERSION:
            raise ValueError(f"{source} has profile version {doc.get('version')}; this sparse-dit reads version {VERSION}")
        header = dict(doc["header"])
        buckets = [tuple(map(float, b)) for b in header.pop("buckets")]
        plan = [[[HeadChoice.from_json(h) for h in layer] for layer in entry["layers"]] for entry in doc["plan"]]
        if len(plan) != len(buckets):
            raise ValueError(f"{source}: {len(plan)} plan entries for {len(buckets)} buckets")
        for b, bucket in enumerate(plan):
            if len(bucket) != int(header["layers"]) or any(len(layer) != int(header["heads"]) for layer in bucket):
                raise ValueError(f"{source}: bucket {b} does not have {header['layers']} layers x {header['heads']} heads")
        return cls(header, buckets, plan, doc.get("summary", {}))

    @classmethod
    def coerce(cls, value: "str | os.PathLike | Profile") -> "Profile":
        """A Profile, a path to a profile file, or the name of a profile shipped in ``profiles/``."""
        if isinstance(value, Profile):
            return value
        path = Path(value)
        if path.is_file():
            return cls.load(path)
        shipped_dir = _shipped_dir()
        shipped = shipped_dir / f"{value}.json"
        if shipped.is_file():
            return cls.load(shipped)
        names = sorted(p.stem for p in shipped_dir.glob("*.json"))
        raise FileNotFoundError(f"no profile file {value!r} and no shipped profile of that name (shipped: {names or 'none'})")
