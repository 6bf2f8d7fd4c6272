"""Calibration that predicts quality: choosable metrics and calibration sets, per-bucket budgets, and the
rank correlation between candidates' calibration error and held-out PSNR (on the reference model, tiny size)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_wan_transformer, wan_inputs

from sparse_dit.calibrate import CalibrationSet, candidate_rank_study, spearman
from sparse_dit.patterns import PatternSpec
from sparse_dit.profiler import METRICS, build_profile, calibrate


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # ties take their average rank
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="3 values against 2"):
        spearman([1, 2, 3], [1, 2])


def test_calibration_set_is_validated_and_enumerated():
    runs = CalibrationSet(("a", "b"), seeds=(3, 4), images=("x.png",)).runs()
    assert [(r.index, r.prompt, r.seed, r.image) for r in runs] == [(0, "a", 3, "x.png"), (1, "a", 4, "x.png"),
                                                                    (2, "b", 3, "x.png"), (3, "b", 4, "x.png")]
    with pytest.raises(ValueError, match="unknown calibration metric"):
        CalibrationSet(("a",), metrics=("psnr",))
    with pytest.raises(ValueError, match="at least one non-empty prompt"):
        CalibrationSet(("",))


@pytest.fixture(scope="module")
def wan_stats():
    """Every metric in one pass, the middle one of three steps left unmeasured."""
    model = make_wan_transformer(heads=2, head_dim=16, layers=2, seed=3)
    x, _, text = wan_inputs(batch=1, frames=4, height=8, width=8, seed=4)
    steps = iter(range(10))

    def run():
        with torch.no_grad():
            for t in (900, 600, 300):
                next(steps)
                model(x, torch.full((1,), t), text)

    candidates = [PatternSpec("dense"), PatternSpec("tile", window=(1, 1, 1)), PatternSpec("tile", window=(4, 2, 2)),
                  PatternSpec("radial", decay=0.5), PatternSpec("prune", keep_ratio=0.3)]
    return calibrate(model, run, candidates=candidates, block_size=16, query_rows=32, metrics=tuple(METRICS),
                     measure_step=lambda step: step != 1)


def test_metrics_are_recorded_in_one_pass_and_unmeasured_steps_still_cut_buckets(wan_stats):
    stats = wan_stats
    assert stats.metrics == list(METRICS) and stats.metric == "rel_l2"
    assert stats.timesteps == [0.9, 0.3] and stats.all_timesteps == [0.9, 0.6, 0.3]
    for metric in METRICS:
        err, _ = stats.mean(stats.timesteps, metric)
        assert torch.all(err[..., 0] == 0) and torch.all(err[..., 1:] >= 0) and torch.all(err[..., 1:] < 10)
    mass, _ = stats.mean(stats.timesteps, "mass")
    assert torch.all(mass[..., 1:] <= 1)
    # the tile window 4x2x2 (tiles of 1x4x4) keeps everything on this grid: no error under any metric
    for metric in METRICS:
        assert float(stats.mean(stats.timesteps, metric)[0][..., 2].max()) < 1e-6
    profile = build_profile(stats, target_density=0.6, num_buckets=2, dense_fraction=0.3, block_size=16)
    assert profile.dense_above == pytest.approx(0.75)  # cut between 0.9 and 0.6, the unmeasured step counts
    assert profile.header["calibration"]["measured_timesteps"] == [0.9, 0.3]


def test_per_bucket_budgets(wan_stats):
    profile = build_profile(wan_stats, target_density=[0.9, 0.3], num_buckets=2, dense_fraction=0.0, block_size=16)
    per_bucket = profile.summary["per_bucket_density"]
    assert per_bucket[0] <= 0.9 + 1e-9 and per_bucket[1] <= 0.3 + 1e-9 and per_bucket[0] > per_bucket[1]
    assert profile.header["budget"] == {"target_density": [0.9, 0.3]}
    with pytest.raises(ValueError, match="3 per-bucket target densities for 2 buckets"):
        build_profile(wan_stats, target_density=[0.5, 0.5, 0.5], num_buckets=2, dense_fraction=0.0)


def test_bucket_weights_move_the_budget_to_the_weighted_bucket(wan_stats):
    """One overall budget; weighting the high-noise bucket's errors moves density there (the mean stays within the
    budget), the reverse weighting moves it away, and equal weights change nothing."""
    kw = dict(target_density=0.5, num_buckets=2, dense_fraction=0.0, block_size=16)
    plain = build_profile(wan_stats, **kw)
    same = build_profile(wan_stats, bucket_weights=(1.0, 1.0), **kw)
    early = build_profile(wan_stats, bucket_weights=(20.0, 1.0), **kw)
    late = build_profile(wan_stats, bucket_weights=(1.0, 20.0), **kw)
    assert same.summary["per_bucket_density"] == plain.summary["per_bucket_density"]
    d_plain, d_early, d_late = (p.summary["per_bucket_density"] for p in (plain, early, late))
    assert d_early[0] >= d_plain[0] >= d_late[0] and d_early[0] > d_late[0]
    for p in (plain, early, late):
        assert p.density() <= 0.5 + 1e-9
    assert early.header["budget"] == {"target_density": 0.5, "bucket_weights": [20.0, 1.0]}
    with pytest.raises(ValueError, match="one overall target_density"):
        build_profile(wan_stats, target_density=[0.5, 0.5], num_buckets=2, dense_fraction=0.0, bucket_weights=(2, 1))
    with pytest.raises(ValueError, match="positive numbers"):
        build_profile(wan_stats, bucket_weights=(2, 0), **kw)
    with pytest.raises(ValueError, match="3 bucket_weights for 2 buckets"):
        build_profile(wan_stats, bucket_weights=(3, 2, 1), **kw)


def test_rank_study_on_the_reference_model_at_tiny_size():
    """Candidates ranked by calibration error and by held-out PSNR; every metric reports its correlation."""
    from sparse_dit.reference import load_reference_model, sample_scene

    ref = load_reference_model("cpu", torch.float32)
    candidates = [PatternSpec("tile", window=(1, 1, 1)), PatternSpec("tile", window=(2, 1, 1)), PatternSpec("radial", decay=0.25),
                  PatternSpec("prune", keep_ratio=0.25), PatternSpec("prune", keep_ratio=0.6)]
    calibration = CalibrationSet((sample_scene(10_000).prompt,), seeds=(0,), query_rows=32, metrics=tuple(METRICS))
    study = candidate_rank_study(candidates, model=ref, calibration=calibration, heldout_seeds=(0,), steps=3,
                                 frames=4, height=16, width=16, block_size=16, backend="reference")
    assert len(study["candidates"]) == len(candidates)
    assert set(study["spearman"]) == set(METRICS)
    for metric, rho in study["spearman"].items():
        assert -1.0 <= rho <= 1.0, (metric, study)
    # calibration error must carry information about final quality: a positive rank correlation
    assert study["spearman"]["rel_l2"] > 0, study


# ---------------------------------------------------------------------------------- a profile states its cost
def test_flop_cost_model_and_expected_speedup():
    from sparse_dit.costmodel import candidate_cost, expected_speedup, flop_cost_model
    from sparse_dit.geometry import Geometry
    from sparse_dit.profile import HeadChoice, Profile

    geometry = Geometry(1, 2, 64, 16, 30, 52)
    model = flop_cost_model(geometry, 128)
    assert model["measured"] is False and model["source"].startswith("FLOP estimate, not measured")
    assert model["overhead"]["tile"] == 0 and 0 < model["overhead"]["prune"] < model["overhead"]["kmeans"] < 0.1
    tile = PatternSpec("tile", window=(3, 3, 3))
    assert candidate_cost(tile, 0.25, model) == pytest.approx(0.25)
    assert candidate_cost(PatternSpec("dense"), 0.1, model) == 1.0
    # two buckets of equal weight, one at density 0.25, one at 0.5, plus one dense warm-up step out of five
    plan = [[[HeadChoice(tile, 0.1, 0.25)] * 2], [[HeadChoice(tile, 0.1, 0.5)] * 2]]
    header = {"layers": 1, "heads": 2, "dense_above": 0.85, "cost_model": model,
              "calibration": {"grid": [16, 30, 52], "timesteps": [1.0, 0.8, 0.6, 0.4, 0.2]}}
    profile = Profile(header, [(0.5, 0.85), (0.0, 0.5)], plan)
    cost = expected_speedup(profile)
    assert cost["per_bucket"] == [pytest.approx(4.0), pytest.approx(2.0)]
    assert cost["sparse_steps"] == pytest.approx(1 / 0.375, abs=1e-3)
    assert cost["with_dense_warmup"] == pytest.approx(1 / (0.2 + 0.8 * 0.375), abs=1e-3)
    assert cost["measured"] is False


def test_measured_cost_model_times_every_pattern():
    """The timing path runs anywhere (on CI: the CPU); on the GPU a profile is made on it prices that GPU."""
    from sparse_dit.costmodel import measure_cost_model
    from sparse_dit.geometry import Geometry

    geometry = Geometry(1, 2, 32, 4, 8, 8)
    candidates = [PatternSpec("dense"), PatternSpec("tile", window=(1, 1, 1)), PatternSpec("tile", window=(2, 2, 2)),
                  PatternSpec("radial", decay=0.5), PatternSpec("prune", keep_ratio=0.3)]
    model = measure_cost_model(geometry, candidates, 16, device="cpu", dtype=torch.float32, repeats=2)
    assert model["measured"] is True and model["source"].startswith("measured on CPU")
    assert model["pair_cost"] > 0 and set(model["overhead"]) == {"dense", "tile", "radial", "prune"}
    assert all(v >= 0 for v in model["overhead"].values())


def test_inspect_prints_the_expected_speedup_next_to_density(capsys):
    from sparse_dit import cli

    assert cli.main(["inspect", "reference"]) == 0
    out = capsys.readouterr().out
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    from sparse_dit.profile import Profile

    shipped = Profile.coerce("reference")
    assert f"density {shipped.density():.3f}" in overall
    assert f"expected attention speed-up {shipped.header['cost']['sparse_steps']:.2f}x on sparse steps" in overall
    assert "NOT measured: FLOP estimate" in out and "calibrated at 16x12x12" in out
    assert "expected speed-up" in next(line for line in out.splitlines() if line.startswith("bucket 0"))


def test_a_failed_cost_measurement_keeps_the_calibration(wan_stats, monkeypatch):
    from sparse_dit import costmodel
    from sparse_dit.calibrate import measured_cost_model_or_estimate

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(costmodel, "measure_cost_model", broken)
    with pytest.warns(UserWarning, match="measuring the cost table on cpu failed .*no kernel for this GPU.* FLOP estimate"):
        assert measured_cost_model_or_estimate(wan_stats, 16, torch.device("cpu")) is None
    profile = build_profile(wan_stats, target_density=0.6, block_size=16, cost_model=None)
    assert profile.header["cost"]["measured"] is False


def test_kmeans_candidates_share_one_clustering_per_call(monkeypatch):
    """Candidates that differ only in top_p select from the same clusters: the first clusters from scratch, the
    rest warm-start from it (a few Lloyd steps), and their errors still order as their budgets do."""
    import sparse_dit.patterns.kmeans as kmeans_module

    iters_seen: list[int] = []
    original = kmeans_module.kmeans

    def counting(x, C, iters, *args, **kwargs):
        iters_seen.append(int(iters))
        return original(x, C, iters, *args, **kwargs)

    monkeypatch.setattr(kmeans_module, "kmeans", counting)
    model = make_wan_transformer(heads=2, head_dim=16, layers=1)
    x, t, text = wan_inputs(frames=4, height=8, width=8)
    small = dict(q_tokens_per_cluster=16, k_tokens_per_cluster=8, iters=6, warm_iters=2)
    cands = [PatternSpec("dense"), *(PatternSpec("kmeans", top_p=p, **small) for p in (0.3, 0.6, 0.9))]
    stats = calibrate(model, lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=text),
                      candidates=cands, block_size=16, query_rows=32)
    # one layer, one call: q and k clustered from scratch once (6 iterations), warm (2) for the other candidates
    assert iters_seen == [6, 6, 2, 2, 2, 2]
    err = stats.mean(stats.timesteps)[0][0].mean(0)  # (C,) mean over heads
    assert err[1] >= err[2] >= err[3] >= 0
