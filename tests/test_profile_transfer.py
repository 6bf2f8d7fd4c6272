"""Profiles as a property of the model: the transfer rule, several calibration grids, older files, unfit
profiles, and the shipped reference profile at the sizes of `sparse-dit demo` and `sparse-dit eval`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_wan_transformer, wan_inputs

import sparse_dit
from sparse_dit.patterns import PatternSpec
from sparse_dit.profile import Profile, grid_distance, plan_for_grid, transfer_spec
from sparse_dit.profiler import build_profile, calibrate

DATA = Path(__file__).parent / "data"
CALIBRATION_GRID = (4, 8, 8)


# ------------------------------------------------------------------------------------------ the rule
def test_tile_window_keeps_frames_and_field_of_view():
    # block 16 -> tiles 1x4x4; on 4x8x8 a window (2, 1, 1) covers 2 frames and half the frame each way
    spec = PatternSpec("tile", window=(2, 1, 1))
    assert transfer_spec(spec, (4, 8, 8), (4, 8, 8), 16, 16) is spec
    bigger = transfer_spec(spec, (4, 8, 8), (8, 16, 16), 16, 16)
    assert bigger.params["window"] == (2, 2, 2)  # 2 frames still; half of a 16-token side is 2 tiles of 4
    smaller = transfer_spec(spec, (4, 8, 8), (2, 4, 8), 16, 16)
    assert smaller.params["window"] == (2, 1, 1)  # 2 frames = the whole new clip; half of 4 rounds to one tile
    # a window over the whole calibration clip keeps the whole clip
    whole = transfer_spec(PatternSpec("tile", window=(4, 1, 2)), (4, 8, 8), (12, 8, 8), 16, 16)
    assert whole.params["window"] == (12, 1, 2)
    # another block size: the same extents in the new tile shape (1x8x8 tiles for blocks of 64)
    reblocked = transfer_spec(PatternSpec("tile", window=(2, 2, 2)), (4, 16, 16), (4, 16, 16), 16, 64)
    assert reblocked.params["window"] == (2, 1, 1)


def test_relative_patterns_are_unchanged_and_cluster_counts_scale():
    for spec in (PatternSpec("radial", decay=0.5), PatternSpec("prune", keep_ratio=0.3), PatternSpec("kmeans", top_p=0.8),
                 PatternSpec("dense")):
        assert transfer_spec(spec, (4, 8, 8), (16, 30, 52), 16, 128) == spec
    counted = transfer_spec(PatternSpec("kmeans", q_clusters=4, k_clusters=16), (4, 8, 8), (8, 8, 8), 16, 16)
    assert (counted.params["q_clusters"], counted.params["k_clusters"]) == (8, 32)


def test_grid_distance_is_symmetric_in_log_scale():
    assert grid_distance((4, 8, 8), (4, 8, 8)) == 0
    assert grid_distance((8, 8, 8), (4, 8, 8)) == grid_distance((4, 8, 8), (8, 8, 8)) == 1
    assert grid_distance((4, 16, 4), (4, 8, 8)) == 2


# ----------------------------------------------------------------------- profiles on a Wan transformer
@pytest.fixture(scope="module")
def model():
    return make_wan_transformer(heads=2, head_dim=16, layers=2, seed=5)


def _profile_at(model, grid, seed=0) -> Profile:
    x, _, text = wan_inputs(batch=1, frames=grid[0], height=grid[1], width=grid[2], seed=seed)
    candidates = [PatternSpec("dense"), PatternSpec("tile", window=(1, 1, 1)), PatternSpec("tile", window=(2, 1, 2)),
                  PatternSpec("tile", window=(4, 2, 1)), PatternSpec("radial", decay=0.5)]

    def run():
        with torch.no_grad():
            for t in (900, 500, 100):
                model(x, torch.full((1,), t), text)

    stats = calibrate(model, run, candidates=candidates, block_size=16, query_rows=32, seed=seed)
    return build_profile(stats, target_density=0.5, num_buckets=1, dense_fraction=0.0, block_size=16,
                         model_class=type(model).__name__, model_id="tiny wan")


def _run_at(model, grid) -> dict:
    x, _, text = wan_inputs(batch=1, frames=grid[0], height=grid[1], width=grid[2], seed=9)
    with torch.no_grad():
        for t in (300, 100):
            out = model(x, torch.full((1,), t), text).sample
            assert torch.isfinite(out).all()
    return dict(sparse_dit.patch_state(model).stats)


def test_profile_made_at_one_grid_runs_at_two_others(model):
    profile = _profile_at(model, CALIBRATION_GRID)
    assert profile.grid == CALIBRATION_GRID
    for grid in ((3, 6, 10), (6, 12, 12)):  # smaller, other aspect ratio; larger, more frames
        sparse_dit.patch(model, profile=profile)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # near grids run without a warning
                stats = _run_at(model, grid)
            assert stats["sparse_calls"] == 2 * 2 and 0 < stats["mean_density"] < 1, (grid, stats)
            layout = next(iter(sparse_dit.patch_state(model).layout_cache.values()))
            assert layout.seq_len == grid[0] * grid[1] * grid[2]
        finally:
            sparse_dit.unpatch(model)


def test_far_grid_runs_with_one_warning_saying_how_far(model):
    profile = _profile_at(model, CALIBRATION_GRID)
    sparse_dit.patch(model, profile=profile)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = _run_at(model, (4, 16, 20))  # 2x the height, 2.5x the width
            _run_at(model, (4, 16, 20))
    finally:
        sparse_dit.unpatch(model)
    messages = [str(w.message) for w in caught if "sparse-dit" in str(w.message)]
    assert len(messages) == 1, messages
    assert "4x16x20" in messages[0] and "4x8x8" in messages[0] and "2x the height" in messages[0] and "2.5x the width" in messages[0]
    assert "sparse-dit profile" in messages[0] and "--extend" in messages[0]
    assert stats["sparse_calls"] > 0


def test_several_calibration_grids_pick_the_nearest(model, tmp_path):
    small, large = _profile_at(model, CALIBRATION_GRID), _profile_at(model, (4, 16, 16), seed=1)
    merged = small.merge(large)
    path = merged.save(tmp_path / "two.json")
    loaded = Profile.load(path)
    assert json.loads(path.read_text())["version"] == 2
    assert loaded.calibration_grids() == [CALIBRATION_GRID, (4, 16, 16)]
    assert plan_for_grid(loaded, (4, 9, 9), 16).source.grid == CALIBRATION_GRID
    assert plan_for_grid(loaded, (4, 14, 18), 16).source.grid == (4, 16, 16)
    far = plan_for_grid(loaded, (4, 32, 32), 16)
    assert far.source.grid == (4, 16, 16) and far.far
    assert not plan_for_grid(loaded, (4, 24, 24), 16).far
    # the chosen calibration's own plan, restated: the 16x16 calibration at its own grid is used unchanged
    at_large = plan_for_grid(loaded, (4, 16, 16), 16)
    assert at_large.plan[0] == tuple(tuple(c.spec for c in layer) for layer in large.plan[0])
    with pytest.raises(ValueError, match="different models: layers"):
        small.merge(build_profile(_stats_with_layers(3), target_density=0.5, block_size=16, model_class=type(model).__name__))


def _stats_with_layers(layers: int):
    other = make_wan_transformer(heads=2, head_dim=16, layers=layers, seed=1)
    x, _, text = wan_inputs(batch=1, frames=2, height=8, width=8)
    return calibrate(other, lambda: other(x, torch.full((1,), 500), text), candidates=[PatternSpec("dense"), PatternSpec("radial")],
                     block_size=16, query_rows=8)


# ------------------------------------------------------------------------------------- older files, unfit
def test_version_1_profile_still_loads_and_transfers():
    v1 = Profile.load(DATA / "reference_v1.json")
    assert json.loads((DATA / "reference_v1.json").read_text())["version"] == 1
    assert v1.grid == (16, 12, 12) and v1.more_grids == []
    raw = json.loads((DATA / "reference_v1.json").read_text())["plan"]
    assert [[[(c.spec.name, c.density) for c in layer] for layer in b] for b in v1.plan] == \
        [[[(h["pattern"], h["density"]) for h in layer] for layer in b["layers"]] for b in raw]
    plan = plan_for_grid(v1, (16, 16, 16), 16)
    assert not plan.far and len(plan.plan) == len(v1.buckets) and len(plan.plan[0]) == v1.layers


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.update(model_class="FluxTransformer2DModel"), r"model class: profile FluxTransformer2DModel, model WanTransformer3DModel"),
        (lambda h: h.update(layers=5), r"layers: profile 5, model 2"),
        (lambda h: h.update(heads=3), r"heads: profile 3, model 2"),
    ],
)
def test_unfit_profile_is_refused_before_any_work(model, tmp_path, edit, message):
    doc = _profile_at(model, CALIBRATION_GRID).to_json()
    edit(doc["header"])
    doc["plan"] = [{"bucket": b["bucket"], "layers": [[b["layers"][0][0]] * doc["header"]["heads"]] * doc["header"]["layers"]} for b in doc["plan"]]
    path = tmp_path / "unfit.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        sparse_dit.patch(model, profile=path)
    assert not sparse_dit.is_patched(model)


# --------------------------------------------------------------------- the shipped reference profile
@pytest.fixture(scope="module")
def reference_model():
    from sparse_dit.reference import load_reference_model

    return load_reference_model("cpu", torch.float32)


def test_reference_profile_runs_at_demo_default_size(reference_model):
    """Calibrated on 16x12x12 (48 px), the shipped profile serves `sparse-dit demo` (16 frames of 32 px: grid 16x8x8)
    as it patches (blocks of 32): one denoising call in a sparse bucket, no warning."""
    from sparse_dit.reference import sample_scene

    ref = reference_model
    x = torch.randn(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    context = ref.text_encoder.encode([sample_scene(20_000).prompt], ref.device)
    sparse_dit.patch(ref.transformer, profile="reference", block_size=32)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error")  # near the calibration grid: no warning
            out = ref.transformer(x, torch.tensor([500.0]), context, return_dict=False)[0]
        state = sparse_dit.patch_state(ref.transformer)
        stats, grid = state.stats, state.last_geometry.grid
    finally:
        sparse_dit.unpatch(ref.transformer)
    assert grid == (16, 8, 8)
    assert torch.isfinite(out).all() and out.shape == x.shape
    assert stats["sparse_calls"] == 8 and stats["mean_density"] < 0.8, stats


def test_reference_profile_plans_valid_layouts_at_eval_default_size():
    """`sparse-dit eval`'s default clip (16 frames of 64 px: grid 16x16x16, 4,096 tokens): every static pattern of the
    restated plan builds a valid layout there (a full generation at this size takes minutes on a CPU)."""
    from sparse_dit.geometry import Geometry

    plan = plan_for_grid(Profile.coerce("reference"), (16, 16, 16), 32)
    assert not plan.far
    geometry = Geometry(1, 4, 64, 16, 16, 16)
    specs = {spec for bucket in plan.plan for layer in bucket for spec in layer}
    densities = []
    for spec in specs:
        if spec.static:
            layout = spec.module.build(geometry, 1, 32, "cpu", **spec.params)
            densities.append(float(layout.density_per_head().mean()))
    assert densities and all(0 < d < 1 for d in densities), densities
    windows = {spec.params["window"] for spec in specs if spec.name == "tile"}
    assert (7, 4, 2) in windows  # 16x12x12 window (7, 3, 2) of 1x4x8 tiles: 7 frames, the full 16x16 frame
