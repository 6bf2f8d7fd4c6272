"""`Profile`: the per-(timestep bucket, layer, head) plan the profiler writes and `patch` reads.

A profile is a versioned, human-readable JSON file (version 2; version 1 files still load)::

    {"format": "sparse-dit-profile", "version": 2,
     "header": {"model_class": ..., "model_id": ..., "layers": L, "heads": H, "head_dim": D,
                "calibration": {"grid": [F, H, W], "settings": {...}, "prompts": [...], ...},
                "budget": {...}, "metric": ..., "dense_above": t, "buckets": [[lo, hi], ...],
                "block_size": 128, "cost_model": {...}, "cost": {...}, "transfer": {...},
                "library_version": ..., "created": ...},
     "summary": {...},
     "plan": [{"bucket": [lo, hi],
               "layers": [[{"pattern": "tile", "params": {...}, "error": 0.012, "density": 0.21}, ...per head], ...]}],
     "grids": [ {"header": {...}, "summary": {...}, "plan": [...]}, ... ]}   # optional: more calibration grids

Timesteps are normalised to [0, 1] (1 = pure noise); calls with ``t > dense_above`` run dense (the
warm-up), the rest look up the bucket ``lo <= t <= hi``. Buckets are keyed on the timestep, not on a
call counter, so CFG passes and step counts do not shift them.

**Grids and transfer.** A grid is the video grid (frames, height, width) in tokens after patchify; images
have ``frames == 1``. Each plan is stored as calibrated, with its grid in ``header.calibration.grid``, and
applies at any grid by this rule (`transfer_spec`), which keeps each pattern's meaning rather than its
token counts:

- ``tile``: the window's *temporal* extent is kept in latent frames (the same stretch of time: a longer
  clip at the same frame rate is attended as locally as the calibration clip), except that a window
  that covered the whole calibration clip keeps covering the whole clip; its *spatial* extent is kept
  as a fraction of the frame's height and width (the same field of view at any resolution). Extents
  are converted back to whole tiles of the tile shape used at the new grid (rounded, at least 1, at
  most the tile grid), so a change of ``block_size`` is handled by the same rule.
- ``radial``: unchanged; ``decay`` is already a share of the frame per frame-distance band and
  ``sinks`` a number of frames.
- ``kmeans``: unchanged when clusters are given in tokens per cluster (the default); explicit cluster
  counts are scaled with the number of video tokens.
- ``prune``: unchanged (``keep_ratio`` is a fraction of the video keys). ``dense``: unchanged.

A profile may carry several calibration grids (the primary one plus ``grids``; `Profile.merge` makes one,
``sparse-dit profile --extend`` appends to one); a call uses the calibration grid nearest to its own
(`grid_distance`: summed absolute log2 ratios of frames, height and width). When the call's grid differs
from the nearest calibration grid by a factor of ``far_factor`` (header ``transfer``, default 2) or more in
any dimension, the patched model still runs, with one warning per grid saying how far it is and how to
re-profile.

**Cost.** ``header.cost`` states what the plan is expected to save: the cost table it was priced with
(``source`` says whether it was measured on a GPU or is a FLOP estimate) and the expected attention
speed-up on the sparse steps and over a whole generation with the dense warm-up
(`sparse_dit.costmodel`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparse_dit.patterns import PatternSpec

FORMAT = "sparse-dit-profile"
VERSION = 2
READABLE_VERSIONS = (1, 2)
# a call whose grid differs from the nearest calibration grid by this factor in some dimension gets a warning
FAR_FACTOR = 2.0
TRANSFER_RULE = (
    "tile: temporal window kept in latent frames (whole clip stays whole clip), spatial window kept as a fraction "
    "of the frame, both rounded to whole tiles of the new grid; radial: unchanged (decay per frame-distance band, "
    "share of the frame); kmeans: tokens per cluster unchanged (explicit counts scale with the token count); "
    "prune: keep ratio unchanged"
)
Grid = tuple[int, int, int]


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


# ------------------------------------------------------------------------------------------ transfer
def grid_ratios(grid: Sequence[int], reference: Sequence[int]) -> tuple[float, float, float]:
    """Per dimension (frames, height, width): ``grid / reference``."""
    return tuple(float(g) / float(r) for g, r in zip(grid, reference))  # type: ignore[return-value]


def grid_distance(grid: Sequence[int], reference: Sequence[int]) -> float:
    """How far two grids are apart: the summed ``|log2(grid / reference)|`` of frames, height and width."""
    return sum(abs(math.log2(r)) for r in grid_ratios(grid, reference))


def _extent_to_tiles(extent: float, tile: int, count: int) -> int:
    """An extent in tokens as a whole number of tiles of ``tile`` tokens, within ``[1, count]``."""
    return max(1, min(count, int(math.floor(extent / tile + 0.5))))


def transfer_spec(spec: PatternSpec, from_grid: Sequence[int], to_grid: Sequence[int], from_block: int, to_block: int) -> PatternSpec:
    """``spec`` as calibrated on ``from_grid`` with query blocks of ``from_block``, restated for ``to_grid``
    and ``to_block`` by the rule of this module's docstring. The identity when grid and block are unchanged."""
    from_grid, to_grid = tuple(int(g) for g in from_grid), tuple(int(g) for g in to_grid)
    if from_grid == to_grid and from_block == to_block:
        return spec
    p = spec.params
    if spec.name == "tile" and p.get("window") is not None:
        from sparse_dit.patterns._tiling import default_tile

        old_tile = tuple(p["tile"]) if p.get("tile") is not None else default_tile(from_block, from_grid)
        new_tile = tuple(p["tile"]) if p.get("tile") is not None else default_tile(to_block, to_grid)
        new_counts = [-(-g // t) for g, t in zip(to_grid, new_tile)]
        # the tokens the window covered at calibration (a window never reaches past the grid)
        extent = [min(w * t, g) for w, t, g in zip(p["window"], old_tile, from_grid)]
        frames = to_grid[0] if extent[0] >= from_grid[0] else extent[0]  # the whole clip stays the whole clip
        window = (
            _extent_to_tiles(frames, new_tile[0], new_counts[0]),
            _extent_to_tiles(extent[1] / from_grid[1] * to_grid[1], new_tile[1], new_counts[1]),
            _extent_to_tiles(extent[2] / from_grid[2] * to_grid[2], new_tile[2], new_counts[2]),
        )
        return PatternSpec("tile", **{**p, "window": window})
    if spec.name == "kmeans" and (p.get("q_clusters") is not None or p.get("k_clusters") is not None):
        scale = (to_grid[0] * to_grid[1] * to_grid[2]) / (from_grid[0] * from_grid[1] * from_grid[2])
        scaled = {k: max(1, round(p[k] * scale)) for k in ("q_clusters", "k_clusters") if p.get(k) is not None}
        return PatternSpec("kmeans", **{**p, **scaled})
    return spec  # radial, prune, dense: their parameters are already relative


@dataclass(frozen=True)
class GridPlan:
    """A profile's plan restated for one call grid: ``plan[bucket][layer]`` is the per-head spec tuple.

    source: the calibration (sub-)profile it came from; ratios: call grid / calibration grid per dimension;
    far: whether some ratio is at least the profile's far factor (or at most its inverse).
    """

    source: "Profile"
    grid: Grid
    plan: tuple[tuple[tuple[PatternSpec, ...], ...], ...]
    ratios: tuple[float, float, float]
    far: bool

    def far_warning(self) -> str:
        """The one warning of a call on a grid far from every calibration grid: how far, and what to do."""
        cal = self.source.grid
        dims = ", ".join(f"{r:.2g}x the {name}" for r, name in zip(self.ratios, ("frames", "height", "width")) if abs(math.log2(r)) > 1e-9)
        model = self.source.header.get("model_id") or self.source.header.get("model_class") or "the model"
        return (
            f"sparse-dit: this call's grid {_fmt_grid(self.grid)} (frames x height x width after patchify) is far from the "
            f"nearest grid the profile of {model} was calibrated at, {_fmt_grid(cal)} ({dims}); the patterns were "
            "rescaled by the profile's transfer rule, but quality at this size is not calibrated. Re-profile at this "
            "resolution and length: `sparse-dit profile --model ... --height H --width W --frames N --extend PROFILE --out NEW` "
            "(keeps the profile's other grids and adds this one)"
        )


def _fmt_grid(grid: Sequence[int] | None) -> str:
    return "x".join(map(str, grid)) if grid else "?"


@dataclass
class Profile:
    """header: metadata (see module docstring); buckets: [(lo, hi)]; plan[bucket][layer][head]: HeadChoice;
    more_grids: profiles of the same model calibrated at other grids (each with its own header, buckets and plan)."""

    header: dict
    buckets: list[tuple[float, float]]
    plan: list[list[list[HeadChoice]]]
    summary: dict = field(default_factory=dict)
    more_grids: list["Profile"] = field(default_factory=list)

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

    @property
    def grid(self) -> Grid | None:
        """The calibration grid (frames, height, width after patchify) of the primary plan; None if not calibrated."""
        grid = (self.header.get("calibration") or {}).get("grid")
        return tuple(int(g) for g in grid) if grid else None  # type: ignore[return-value]

    @property
    def block_size(self) -> int:
        return int(self.header.get("block_size", 128))

    @property
    def far_factor(self) -> float:
        return float((self.header.get("transfer") or {}).get("far_factor", FAR_FACTOR))

    def calibrations(self) -> list["Profile"]:
        """The primary plan and those of the other calibration grids, each as a `Profile`."""
        return [self, *self.more_grids]

    def calibration_grids(self) -> list[Grid | None]:
        return [p.grid for p in self.calibrations()]

    def nearest(self, grid: Sequence[int]) -> "Profile":
        """The calibration (this profile or one of ``more_grids``) whose grid is nearest to ``grid``."""
        located = [p for p in self.calibrations() if p.grid is not None]
        if not located:
            return self
        return min(located, key=lambda p: grid_distance(grid, p.grid))

    def merge(self, *others: "Profile") -> "Profile":
        """One profile holding this one's calibration grids and those of ``others`` (same model class, layers
        and heads). A grid calibrated twice keeps the later calibration; this profile's first grid stays primary
        unless replaced."""
        by_grid: dict[Any, Profile] = {}
        for prof in (self, *others):
            for cal in prof.calibrations():
                for key in ("model_class", "layers", "heads"):
                    if cal.header.get(key) != self.header.get(key):
                        raise ValueError(
                            f"cannot merge profiles of different models: {key} {self.header.get(key)!r} vs {cal.header.get(key)!r}"
                        )
                if cal.grid is None:
                    raise ValueError("cannot merge a profile without a calibration grid (e.g. Profile.constant)")
                by_grid[cal.grid] = cal
        plans = [Profile(dict(c.header), list(c.buckets), c.plan, dict(c.summary)) for c in by_grid.values()]
        primary = next((c for c in plans if c.grid == self.grid), plans[0])
        primary.more_grids = [c for c in plans if c is not primary]
        return primary

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

    # ------------------------------------------------------------------------------------------ I/O
    def to_json(self) -> dict:
        doc = {"format": FORMAT, "version": VERSION, **self._body_json()}
        if self.more_grids:
            doc["grids"] = [p._body_json() for p in self.more_grids]
        return doc

    def _body_json(self) -> dict:
        header = {**self.header, "buckets": [list(b) for b in self.buckets]}
        if self.grid is not None:
            header.setdefault("transfer", {"rule": TRANSFER_RULE, "far_factor": FAR_FACTOR})
        return {
            "header": header,
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
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{source} is not a sparse-dit profile (no \"format\": {FORMAT!r} field)")
        if doc.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{source} has profile version {doc.get('version')}; this sparse-dit reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (a newer sparse-dit wrote it: upgrade sparse-dit)"
            )
        profile = cls._from_body(doc, source)
        profile.more_grids = [cls._from_body(g, f"{source} (grid {i + 1})") for i, g in enumerate(doc.get("grids", []))]
        for other in profile.more_grids:
            for key in ("model_class", "layers", "heads"):
                if other.header.get(key) != profile.header.get(key):
                    raise ValueError(f"{source}: its calibration grids disagree on {key}")
        return profile

    @classmethod
    def _from_body(cls, doc: dict, source: str) -> "Profile":
        """One calibration's header, summary and plan (the top level of a file, or an entry of ``grids``)."""
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
        """A Profile, a path to a profile file, or the name of a profile shipped in ``sparse_dit/profiles/`` (see
        `resolve_profile_path`)."""
        if isinstance(value, Profile):
            return value
        return cls.load(resolve_profile_path(value))


_SHIPPED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def shipped_profile_names() -> list[str]:
    """Names (file stems) of the profiles installed with sparse-dit."""
    return sorted(p.stem for p in _shipped_dir().glob("*.json"))


def resolve_profile_path(value: "str | os.PathLike") -> Path:
    """The file a profile argument names.

    A value with a folder separator, a leading dot or a ``.json`` suffix is a file path. A bare name is a shipped
    profile: it never leaves the shipped folder, and a local file of the same name makes the name ambiguous (an
    error saying how to pick one) rather than silently shadowing the shipped profile. A bare name that is not
    shipped may still be a local file. Raises FileNotFoundError or ValueError with a one-line message.
    """
    text = os.fspath(value)
    if not text.strip():
        raise ValueError("the profile argument is empty; give a profile file or a shipped name")
    looks_like_path = not isinstance(value, str) or os.sep in text or "/" in text or text.endswith(".json") \
        or text.startswith(".")
    if not looks_like_path and _SHIPPED_NAME.match(text) and text in shipped_profile_names():
        if Path(text).exists():
            raise ValueError(f"{text!r} is both a shipped profile and a file here; write ./{text} for the file "
                             f"or rename it to use the shipped one")
        return (_shipped_dir() / f"{text}.json").resolve()
    path = Path(text)
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"profile {text!r} is a folder; give a profile file (.json)")
    names = shipped_profile_names()
    raise FileNotFoundError(f"no profile file {text!r} and no shipped profile of that name "
                            f"(shipped: {', '.join(names) or 'none'}); write one with `sparse-dit profile`")


def plan_for_grid(profile: Profile, grid: Sequence[int], block_size: int | None = None) -> GridPlan:
    """The plan ``profile`` gives a call on ``grid`` (frames, height, width after patchify) with query blocks of
    ``block_size`` (default: the profile's): the nearest calibration grid's plan, each head's pattern restated
    by `transfer_spec`. A profile without a calibration grid (`Profile.constant`) is used as it is."""
    grid = tuple(int(g) for g in grid)
    source = profile.nearest(grid)
    block = int(block_size or source.block_size)
    cal = source.grid
    if cal is None:
        plan = tuple(tuple(source.head_plan(b, layer) for layer in range(source.layers)) for b in range(len(source.buckets)))
        return GridPlan(source, grid, plan, (1.0, 1.0, 1.0), False)
    memo: dict[PatternSpec, PatternSpec] = {}

    def restated(spec: PatternSpec) -> PatternSpec:
        if spec not in memo:
            memo[spec] = transfer_spec(spec, cal, grid, source.block_size, block)
        return memo[spec]

    plan = tuple(
        tuple(tuple(restated(c.spec) for c in layer) for layer in bucket) for bucket in source.plan
    )
    ratios = grid_ratios(grid, cal)
    far = any(abs(math.log2(r)) >= math.log2(profile.far_factor) - 1e-9 for r in ratios)
    return GridPlan(source, grid, plan, ratios, far)
