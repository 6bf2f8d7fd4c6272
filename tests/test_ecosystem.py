"""sparse-dit next to the rest of the diffusers toolbox (issue 18), on a real tiny WanPipeline:

- step caches (diffusers' FirstBlockCache, TaylorSeer, MagCache, PyramidAttentionBroadcast, FasterCache; cache-dit
  when installed) in both orders, removed in both orders, with exact outputs, no spurious warnings, and a step clock
  that still counts denoising steps (dense_steps, replan_every) when a cache skips blocks or whole steps;
- group offloading and layerwise casting (fp8 storage) on the CPU; model/sequential CPU offload where diffusers
  allows them on this machine;
- LoRA load / set_adapters / fuse / unfuse / unload / hotswap on a patched pipeline, equal to LoRA on the
  unpatched pipeline with the same mask.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_wan_pipeline

import sparse_dit
from sparse_dit import PatternSpec

STEPS = 6
LAYERS = 2  # make_wan_transformer's blocks
CALLS_PER_STEP = 2  # WanPipeline runs the CFG branches as two transformer calls
# a real sparse pattern on the tiny grid (3, 4, 6): 1-frame x 2x2-token tiles, each query tile sees its neighbours
TILE = {"name": "tile", "window": [1, 1, 1], "tile": [1, 2, 2]}
BLOCK = 16


def gen_kwargs(steps: int = STEPS) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        prompt_embeds=torch.randn(1, 7, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=2.0,
        output_type="latent",
    )


def generate(pipe, steps: int = STEPS, **extra) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**gen_kwargs(steps), **extra, generator=torch.Generator().manual_seed(1)).frames


def generate_quietly(pipe, **extra) -> tuple[torch.Tensor, list[str]]:
    """Generate, and return sparse-dit's warnings raised meanwhile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(pipe, **extra)
    return out, [str(w.message) for w in caught if "sparse-dit" in str(w.message)]


def patch(pipe, **kw):
    return sparse_dit.patch(pipe, pattern=TILE, block_size=BLOCK, **kw)


def stats(pipe) -> dict:
    return sparse_dit.patch_state(pipe.transformer).stats


# ---------------------------------------------------------------------------------------- step caches
def _cache_config(name: str, pipe):
    """A diffusers cache config that really skips work within STEPS steps on the tiny model.

    Random weights make the adaptive caches' decisions arbitrary, so their thresholds are set to skip whenever they
    are allowed to (FirstBlockCache, MagCache); the schedule-driven ones skip on a fixed pattern."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    timestep = lambda: pipe.current_timestep  # noqa: E731
    if name == "first-block":
        return FirstBlockCacheConfig(threshold=1e9)
    if name == "taylorseer":  # Wan's blocks are "blocks.N"; the default identifiers match Flux-style "...attn" names
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, cache_identifiers=[r"^blocks\.\d+$"])
    if name == "magcache":
        return MagCacheConfig(threshold=1e9, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, retention_ratio=0.2)
    if name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
                                               current_timestep_callback=timestep)
    if name == "fastercache":
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
                                 current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True)
    raise KeyError(name)


CACHES = ("first-block", "taylorseer", "magcache", "pab", "fastercache")


def enable_cache(pipe, name: str) -> None:
    pipe.transformer.enable_cache(_cache_config(name, pipe))


@pytest.fixture(scope="module")
def references() -> dict:
    """Outputs of the unpatched, uncached pipeline, the patched one, and each cache alone."""
    pipe = make_wan_pipeline()
    refs = {"plain": generate(pipe)}
    patch(pipe)
    refs["patched"] = generate(pipe)
    sparse_dit.unpatch(pipe)
    for name in CACHES:
        enable_cache(pipe, name)
        refs[name] = generate(pipe)
        pipe.transformer.disable_cache()
    assert torch.equal(generate(pipe), refs["plain"])
    return refs


@pytest.mark.parametrize("removal", ["unpatch-first", "cache-first"])
@pytest.mark.parametrize("order", ["patch-then-cache", "cache-then-patch"])
@pytest.mark.parametrize("cache", CACHES)
def test_cache_with_patch(cache, order, removal, references):
    assert not torch.equal(references[cache], references["plain"]), f"{cache} skipped nothing; the test would prove nothing"
    pipe = make_wan_pipeline()
    if order == "patch-then-cache":
        patch(pipe)
        enable_cache(pipe, cache)
    else:
        enable_cache(pipe, cache)
        patch(pipe)
    both, warned = generate_quietly(pipe)
    assert warned == [], warned  # no "no patched attention layer ran", no "processor does not call SDPA"
    s = stats(pipe)
    assert s["sparse_calls"] > 0 and s["skipped_calls"] > 0, s
    assert s["dense_calls"] == 0, s["dense_reasons"]  # skipped layers are not miscounted as dense
    assert s["sparse_calls"] + s["skipped_calls"] == STEPS * CALLS_PER_STEP * LAYERS, s
    assert not torch.equal(both, references[cache]) and not torch.equal(both, references["patched"])
    if removal == "unpatch-first":
        sparse_dit.unpatch(pipe)
        assert torch.equal(generate(pipe), references[cache])  # the cache is intact
        pipe.transformer.disable_cache()
    else:
        pipe.transformer.disable_cache()
        out, warned = generate_quietly(pipe)
        assert warned == [] and torch.equal(out, references["patched"])  # the patch is intact
        assert stats(pipe)["skipped_calls"] == s["skipped_calls"]  # nothing skipped any more
        sparse_dit.unpatch(pipe)
    assert torch.equal(generate(pipe), references["plain"])


@pytest.mark.parametrize("cache", CACHES)
def test_cache_order_does_not_matter(cache, references):
    """Patch-then-cache and cache-then-patch give the same output: the hooks compose the same way."""
    outs = []
    for first_patch in (True, False):
        pipe = make_wan_pipeline()
        if first_patch:
            patch(pipe)
        enable_cache(pipe, cache)
        if not first_patch:
            patch(pipe)
        outs.append(generate(pipe))
    assert torch.equal(outs[0], outs[1])


class StepRecorder:
    """callback_on_step_end: the patch stats after every denoising step, as per-step differences."""

    def __init__(self, pipe) -> None:
        self.pipe, self.rows, self.last = pipe, [], None

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        s = stats(self.pipe)
        now = (s["sparse_calls"], s["dense_calls"], s["skipped_calls"])
        last = self.last or (0, 0, 0)
        self.rows.append(tuple(a - b for a, b in zip(now, last)) + (sparse_dit.patch_state(self.pipe.transformer).step,))
        self.last = now
        return {}


@pytest.mark.parametrize("cache", ["first-block", "taylorseer", "magcache"])
def test_step_clock_and_dense_steps_count_steps_a_cache_skips(cache):
    """dense_steps counts denoising steps, not the steps in which layers ran: per step, every layer call is
    dense (warm-up), sparse or skipped, and the clock reads the step the scheduler is at."""
    dense_steps = 2
    pipe = make_wan_pipeline()
    patch(pipe, dense_steps=dense_steps)
    enable_cache(pipe, cache)
    rec = StepRecorder(pipe)
    _, warned = generate_quietly(pipe, callback_on_step_end=rec)
    assert warned == []
    assert [r[3] for r in rec.rows] == list(range(STEPS))  # the clock follows the scheduler's steps
    for step, (sparse, dense, skipped, _) in enumerate(rec.rows):
        assert sparse + dense + skipped == CALLS_PER_STEP * LAYERS, (step, rec.rows)
        if step < dense_steps:
            assert sparse == 0, (step, rec.rows)
        else:
            assert dense == 0, (step, rec.rows)
    assert sum(r[2] for r in rec.rows) > 0, rec.rows  # the cache did skip
    # a step in which the cache skipped every layer, and the following computed step is still sparse
    assert any(r[0] == 0 and r[1] == 0 for r in rec.rows) or cache == "first-block"
    s = stats(pipe)
    assert s["dense_reasons"] == {"dense_steps": sum(r[1] for r in rec.rows)}


def test_replan_every_counts_denoising_steps_when_a_cache_skips_them(monkeypatch):
    """A dynamic pattern re-planned every 2nd step plans at the steps the scheduler is at, whatever a cache skipped:
    TaylorSeer computes steps 0, 1, 3, 5 (skips 2, 4); with replan_every=2 plans are made at steps 0, 3 (3 - 0 >= 2)
    and 5 (5 - 3 >= 2), and reused at step 1."""
    from sparse_dit.patterns import PatternSpec as Spec

    spec = Spec.coerce({"name": "prune", "keep_ratio": 0.5})
    planned: list[int] = []
    real_build = spec.module.build

    def counting_build(*args, **kw):
        planned.append(state.step)
        return real_build(*args, **kw)

    pipe = make_wan_pipeline()
    sparse_dit.patch(pipe, pattern=spec, block_size=BLOCK, replan_every=2)
    state = sparse_dit.patch_state(pipe.transformer)
    enable_cache(pipe, "taylorseer")
    monkeypatch.setattr(spec.module, "build", counting_build)
    rec = StepRecorder(pipe)
    _, warned = generate_quietly(pipe, callback_on_step_end=rec)
    assert warned == []
    computed = [step for step, r in enumerate(rec.rows) if r[0]]
    skipped_steps = [step for step, r in enumerate(rec.rows) if r[2] == CALLS_PER_STEP * LAYERS]
    assert skipped_steps, rec.rows
    expected, last = [], None
    for step in computed:
        if last is None or step - last >= 2:
            expected.append(step)
            last = step
    assert sorted(set(planned)) == expected, (planned, computed)


def test_cache_dit_both_orders(references):
    cache_dit = pytest.importorskip("cache_dit")
    from cache_dit import DBCacheConfig

    config = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, residual_diff_threshold=1e9,
                  num_inference_steps=STEPS, enable_separate_cfg=True)
    outs = {}
    for order in ("patch-then-cache", "cache-then-patch"):
        pipe = make_wan_pipeline()
        if order == "patch-then-cache":
            patch(pipe)
        cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(**config))
        if order == "cache-then-patch":
            patch(pipe)
        try:
            out, warned = generate_quietly(pipe)
            assert warned == [], warned
            s = stats(pipe)
            assert s["sparse_calls"] > 0 and s["skipped_calls"] > 0 and s["dense_calls"] == 0, s
            outs[order] = out
            cached_alone = None
            sparse_dit.unpatch(pipe)
            cached_alone = generate(pipe)
            assert not torch.equal(cached_alone, references["plain"])
        finally:
            cache_dit.disable_cache(pipe)  # also restores the class-level __call__ cache-dit replaces
        assert torch.equal(generate(pipe), references["plain"])
        patch(pipe)  # and the patch still works on the restored pipeline
        assert torch.equal(generate(pipe), references["patched"])
    assert torch.equal(outs["patch-then-cache"], outs["cache-then-patch"])


def test_compiled_before_patch_warning_still_fires_without_a_cache(references):
    """The cache-aware warning keeps its job: with no cache, a call where no patched layer ran still warns."""
    pipe = make_wan_pipeline()
    patch(pipe)
    state = sparse_dit.patch_state(pipe.transformer)
    state._local.ran = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state._local.entered = 0
        state.end_call(pipe.transformer)
    assert any("no patched attention layer ran" in str(w.message) for w in caught)
    enable_cache(pipe, "first-block")
    fresh = sparse_dit.patch_state(pipe.transformer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh._warned.clear()
        fresh._local.entered, fresh._local.ran = 0, set()
        fresh.end_call(pipe.transformer)
    assert not caught and fresh.stats["skipped_calls"] == LAYERS


# ---------------------------------------------------------------------------------------- offloading
@pytest.mark.parametrize("kind", ["block", "leaf", "block-lazy"])
def test_group_offloading_on_cpu(kind, references):
    from diffusers.hooks import apply_group_offloading

    kw = dict(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    if kind == "block" or kind == "block-lazy":
        kw.update(offload_type="block_level", num_blocks_per_group=1)
    else:
        kw.update(offload_type="leaf_level", use_stream=False)
    for order in ("patch-then-offload", "offload-then-patch"):
        pipe = make_wan_pipeline()
        if order == "patch-then-offload":
            patch(pipe)
        apply_group_offloading(pipe.transformer, **kw)
        if order == "offload-then-patch":
            patch(pipe)
        out, warned = generate_quietly(pipe)
        assert warned == [] and torch.equal(out, references["patched"])
        assert stats(pipe)["sparse_calls"] == STEPS * CALLS_PER_STEP * LAYERS
        sparse_dit.unpatch(pipe)
        assert torch.equal(generate(pipe), references["plain"])


def test_layerwise_casting_fp8_storage():
    pipe, ref = make_wan_pipeline(), make_wan_pipeline()
    for p in (pipe, ref):
        p.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    plain = generate(ref)
    patch(pipe)
    out, warned = generate_quietly(pipe)
    assert warned == [] and stats(pipe)["sparse_calls"] == STEPS * CALLS_PER_STEP * LAYERS
    assert any(p.dtype == torch.float8_e4m3fn for p in pipe.transformer.parameters())  # still stored in fp8
    sparse_dit.patch(ref, pattern="dense")
    assert torch.equal(generate(ref), plain)  # dense patch == unpatched under casting
    assert not torch.equal(out, plain)
    sparse_dit.unpatch(pipe)
    assert torch.equal(generate(pipe), plain)


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_cpu_offload_where_diffusers_allows_it(method, references):
    """Where the offload hooks run on this machine without sparse-dit, they run with it, with the same output."""
    ref = make_wan_pipeline()
    try:
        getattr(ref, method)(device="cpu")
        offloaded = generate(ref)
    except Exception as e:  # accelerate's sequential offload needs an accelerator; the GPU benchmark covers it
        pytest.skip(f"{method} does not run on a CPU-only machine even without sparse-dit: {type(e).__name__}: {str(e)[:80]}")
    assert torch.equal(offloaded, references["plain"])
    pipe = make_wan_pipeline()
    patch(pipe)
    getattr(pipe, method)(device="cpu")
    out, warned = generate_quietly(pipe)
    assert warned == [] and torch.equal(out, references["patched"])
    sparse_dit.unpatch(pipe)
    assert torch.equal(generate(pipe), references["plain"])


# ---------------------------------------------------------------------------------------------- LoRA
def _lora_dir(tmp_path_factory, seed: int, name: str) -> str:
    """A rank-4 LoRA on the attention projections of the tiny Wan transformer, made with peft (no hub)."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = make_wan_pipeline().transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp(name)
    WanPipeline.save_lora_weights(str(path), transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> tuple[str, str]:
    pytest.importorskip("peft")
    return _lora_dir(tmp_path_factory, 1, "lora_a"), _lora_dir(tmp_path_factory, 2, "lora_b")


def _lora_round_trip(pipe, loras: tuple[str, str]) -> list[torch.Tensor]:
    """The outputs of one LoRA life cycle on ``pipe`` (pipeline-level API)."""
    a, b = loras
    outs = []
    pipe.load_lora_weights(a, adapter_name="a")
    outs.append(generate(pipe))
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
    outs.append(generate(pipe))
    pipe.set_adapters("b")
    outs.append(generate(pipe))
    pipe.fuse_lora(lora_scale=0.8)
    outs.append(generate(pipe))
    pipe.unfuse_lora()
    outs.append(generate(pipe))
    pipe.unload_lora_weights()
    outs.append(generate(pipe))
    return outs


def test_lora_life_cycle_on_a_patched_pipeline(loras, references):
    plain = make_wan_pipeline()
    patched = make_wan_pipeline()
    expected = _lora_round_trip(plain, loras)
    patch(patched)
    got = _lora_round_trip(patched, loras)
    assert stats(patched)["sparse_calls"] == len(got) * STEPS * CALLS_PER_STEP * LAYERS
    # unloaded: back to the patched output (up to the rounding fuse + unfuse leaves in the weights, as without sparse-dit)
    assert torch.allclose(got[-1], references["patched"], atol=1e-5)
    assert torch.allclose(expected[-1], references["plain"], atol=1e-5)
    # each LoRA state reached on an unpatched pipeline, then patched with the same mask: equal to the patched one's;
    # and unpatched again, equal to LoRA without sparse-dit
    mirror = make_wan_pipeline()
    a, b = loras
    mirror.load_lora_weights(a, adapter_name="a")
    for i, step in enumerate(["a", "ab", "b", "fused", "unfused", "unloaded"]):
        if step == "ab":
            mirror.load_lora_weights(b, adapter_name="b")
            mirror.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
        elif step == "b":
            mirror.set_adapters("b")
        elif step == "fused":
            mirror.fuse_lora(lora_scale=0.8)
        elif step == "unfused":
            mirror.unfuse_lora()
        elif step == "unloaded":
            mirror.unload_lora_weights()
        patch(mirror)
        assert torch.equal(generate(mirror), got[i]), step
        sparse_dit.unpatch(mirror)
        assert torch.equal(generate(mirror), expected[i]), step
    assert not torch.equal(got[0], got[2])  # the adapters change the output


def test_lora_hotswap_on_a_patched_pipeline(loras):
    a, b = loras
    pipe, mirror = make_wan_pipeline(), make_wan_pipeline()
    for p in (pipe, mirror):
        p.enable_lora_hotswap(target_rank=4)
    patch(pipe)
    pipe.load_lora_weights(a, adapter_name="x")
    pipe.load_lora_weights(b, adapter_name="x", hotswap=True)
    swapped = generate(pipe)
    mirror.load_lora_weights(b, adapter_name="x")
    patch(mirror)
    assert torch.equal(swapped, generate(mirror))
    assert sparse_dit.patch_state(pipe.transformer).stats["sparse_calls"] > 0


# ------------------------------------------------------------------------------------ the GPU benchmark
def test_ecosystem_benchmark_runs_on_cpu(tmp_path):
    """CPU smoke run of benchmarks/ecosystem.py on tiny shapes: every case runs, the pinned skip schedules hold."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ecosystem.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--parts", "speed,quality", "--sparse", "tile",
           "--quality-sparse", "tile", "--model", "tiny", "--no-compile", "--steps", "8",
           "--warmup", "2", "--reps", "1", "--frames", "3", "--height", "32", "--width", "48", "--clips", "1", "--block", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "ecosystem_speed_quality.json").read_text())
    speed = {r["case"]: r for r in results["speed"]["rows"]}
    assert list(speed) == ["dense", "tile", "fbc", "tile+fbc", "taylorseer", "tile+taylorseer", "magcache", "tile+magcache"]
    assert not any("error" in r for r in speed.values())
    # FirstBlockCache: steps 0, 1 (warm-up), then every 2nd: 2, 4, 6; MagCache: 0, 1, then 1 computed per 3: 4, 7;
    # TaylorSeer: 0, 1, then every 3rd from warm-up + 1: 3, 6
    assert speed["fbc"]["computed"] == speed["tile+fbc"]["computed"] == 5
    assert speed["magcache"]["computed"] == speed["tile+magcache"]["computed"] == 4
    assert speed["taylorseer"]["computed"] == speed["tile+taylorseer"]["computed"] == 4
    for name in ("tile+fbc", "tile+taylorseer", "tile+magcache"):
        r = speed[name]
        assert r["skipped_calls"] > 0 and r["sparse_calls"] > 0 and r["schedule_confirmed"]
        assert r["dense_calls"] == 2 * 2 * 2  # warm-up steps x CFG calls x layers
    quality = {r["case"]: r for r in results["quality"]["rows"]}
    assert set(quality) == {"tile", "fbc", "tile+fbc", "taylorseer", "tile+taylorseer", "magcache", "tile+magcache"}
    assert all(r["ssim_mean"] <= 1.0 for r in quality.values())
    # the schedule the speed part reads its step kinds from is what diffusers' hooks did (counted eagerly)
    assert all(r["computed"] == r["schedule_computed"] for r in quality.values()), quality
    assert (quality["fbc"]["computed"], quality["taylorseer"]["computed"], quality["magcache"]["computed"]) == (5, 4, 4)
    assert "| tile+magcache |" in (tmp_path / "ecosystem_speed_quality.md").read_text()


@pytest.mark.parametrize("cache", ["first-block", "magcache"])
def test_cache_and_patch_under_regional_compile(cache):
    """As the benchmark runs them: blocks compiled (dynamo, eager backend on the CPU) with a cache and the patch."""
    outs, counts = [], []
    for compiled in (False, True):
        torch.compiler.reset()
        pipe = make_wan_pipeline()
        patch(pipe)
        enable_cache(pipe, cache)
        if compiled:
            pipe.transformer.compile_repeated_blocks(fullgraph=False, backend="eager")
        out, warned = generate_quietly(pipe)
        assert warned == [], warned
        outs.append(out)
        counts.append((stats(pipe)["sparse_calls"], stats(pipe)["skipped_calls"]))
    torch.compiler.reset()
    assert counts[0] == counts[1] and counts[0][1] > 0, counts
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
