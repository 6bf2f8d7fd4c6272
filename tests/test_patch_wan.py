"""patch/unpatch on the real diffusers WanTransformer3DModel and WanPipeline (small configs, random weights)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_wan_pipeline, make_wan_transformer, wan_inputs

import sparse_dit
from sparse_dit import PatternSpec


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def random_block_mask(heads: int, seq_len: int, block: int, density: float, seed: int, batch: int = 1) -> torch.Tensor:
    nb = -(-seq_len // block)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, nb, nb, generator=g) < density
    mask |= torch.eye(nb, dtype=torch.bool)  # every query block keeps at least its own keys
    return mask


def token_mask_from_blocks(mask: torch.Tensor, block: int, seq_len: int) -> torch.Tensor:
    """(L, H, S, S) token mask: token i sees token j iff block (i // block, j // block) is kept."""
    idx = torch.arange(seq_len) // block
    return mask[:, :, idx][:, :, :, idx]


class ExplicitMask:
    """Runs the *unpatched* model with a boolean attention mask on every self-attention (attn1) call,
    through diffusers' own attention_mask argument."""

    def __init__(self, model, token_mask: torch.Tensor):
        self.handles = [
            block.attn1.register_forward_pre_hook(lambda mod, args, m=token_mask: (args[0], args[1], m, *args[3:]))
            for block in model.blocks
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_dense_pattern_equals_unpatched_and_unpatch_restores_bitwise(wan):
    inputs = wan_inputs(frames=3, height=6, width=10)
    ref = run(wan, inputs)
    sparse_dit.patch(wan, pattern="dense")
    assert sparse_dit.is_patched(wan)
    out = run(wan, inputs)
    assert (out - ref).abs().max().item() <= 1e-6
    sparse_dit.unpatch(wan)
    assert not sparse_dit.is_patched(wan)
    assert torch.equal(run(wan, inputs), ref)
    assert all("_attention_backend" not in vars(b.attn1.processor) for b in wan.blocks)


@pytest.mark.parametrize("pattern", [{"name": "tile", "window": (2, 2, 2)}, {"name": "kmeans"}, {"name": "prune"}])
def test_unpatch_frees_the_patch_state_at_once(wan, pattern):
    """What a patch caches (layouts, k-means centroids: GPU memory at real sizes) is freed when unpatch returns,
    not at some later garbage collection: nothing in a reference cycle holds the patch state."""
    import gc
    import weakref

    inputs = wan_inputs(frames=4, height=8, width=8)
    gc.collect()
    gc.disable()
    try:
        sparse_dit.patch(wan, pattern=pattern, block_size=16)
        state = weakref.ref(sparse_dit.patch_state(wan))
        run(wan, inputs)
        assert state().stats["sparse_calls"] > 0
        sparse_dit.unpatch(wan)
        assert state() is None, "the patch state outlived unpatch (a reference cycle holds it)"
    finally:
        gc.enable()


def test_unpatch_restores_a_user_chosen_backend(wan):
    wan.blocks[0].attn1.set_attention_backend("native")
    sparse_dit.patch(wan, pattern="dense")
    sparse_dit.unpatch(wan)
    assert str(wan.blocks[0].attn1.processor._attention_backend.value) == "native"
    assert "_attention_backend" not in vars(wan.blocks[1].attn1.processor)


@pytest.mark.parametrize("batch", [1, 2])
def test_random_block_mask_equals_unpatched_with_explicit_mask(wan, batch):
    frames, height, width, block = 3, 6, 10, 16
    S = frames * height * width  # 180: not a multiple of the block
    inputs = wan_inputs(batch=batch, frames=frames, height=height, width=width)
    mask = random_block_mask(2, S, block, density=0.35, seed=batch, batch=batch)
    with ExplicitMask(wan, token_mask_from_blocks(mask, block, S)):
        expected = run(wan, inputs)
    assert not torch.allclose(expected, run(wan, inputs), atol=1e-3), "the mask must change the output"
    sparse_dit.patch(wan, pattern=PatternSpec("mask", block_mask=mask, block_size=block), backend="reference")
    out = run(wan, inputs)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    state = sparse_dit.patch_state(wan)
    assert state.stats["sparse_calls"] == 2 and state.stats["dense_calls"] == 0


def test_patch_twice_is_safe_and_replaces(wan):
    inputs = wan_inputs()
    ref = run(wan, inputs)
    S, block = 180, 16
    mask = random_block_mask(2, S, block, 0.3, seed=3)
    sparse_dit.patch(wan, pattern=PatternSpec("mask", block_mask=mask, block_size=block))
    sparse = run(wan, inputs)
    sparse_dit.patch(wan, pattern=PatternSpec("mask", block_mask=mask, block_size=block))
    assert torch.equal(run(wan, inputs), sparse)
    hooks = sum(len(b.attn1._forward_pre_hooks) for b in wan.blocks)
    assert hooks == len(wan.blocks), "re-patching must not stack hooks"
    sparse_dit.patch(wan, pattern="dense")
    assert (run(wan, inputs) - ref).abs().max() <= 1e-6
    sparse_dit.unpatch(wan)
    sparse_dit.unpatch(wan)  # no-op
    assert torch.equal(run(wan, inputs), ref)


def test_two_models_patched_differently_do_not_interfere():
    a, b = make_wan_transformer(seed=0), make_wan_transformer(seed=0)
    inputs = wan_inputs()
    ref = run(a, inputs)
    mask = random_block_mask(2, 180, 16, 0.3, seed=4)
    sparse_dit.patch(a, pattern="dense")
    sparse_dit.patch(b, pattern=PatternSpec("mask", block_mask=mask, block_size=16))
    out_b = run(b, inputs)
    out_a = run(a, inputs)
    assert (out_a - ref).abs().max() <= 1e-6
    assert not torch.allclose(out_b, ref, atol=1e-3)
    assert sparse_dit.patch_state(a).layout_cache == {}
    assert len(sparse_dit.patch_state(b).layout_cache) == 1
    sparse_dit.unpatch(b)
    assert torch.equal(run(b, inputs), ref)


@pytest.mark.parametrize("grid", [(3, 6, 10), (5, 7, 9), (1, 4, 4)])
@pytest.mark.parametrize("batch", [1, 2])
def test_captured_geometry(wan, grid, batch):
    sparse_dit.patch(wan, pattern="dense")
    run(wan, wan_inputs(batch=batch, frames=grid[0], height=grid[1], width=grid[2]))
    geom = sparse_dit.patch_state(wan).last_geometry
    assert (geom.batch, geom.heads, geom.head_dim) == (batch, 2, 16)
    assert geom.grid == grid and geom.seq_len == grid[0] * grid[1] * grid[2]
    assert geom.text_len == 0 and geom.text_position == "none"


def test_pipeline_patch_dense_steps_and_timestep_steps():
    pipe = make_wan_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    kwargs = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=2.0,
        output_type="latent",
    )
    ref = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
    sparse_dit.patch(pipe, pattern="dense")
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
    assert (dense - ref).abs().max() <= 1e-6
    S = 3 * 3 * 5
    mask = random_block_mask(2, S, 16, 0.2, seed=5)
    sparse_dit.patch(pipe, pattern=PatternSpec("mask", block_mask=mask, block_size=16), dense_steps=2)
    pipe(**kwargs, generator=torch.Generator().manual_seed(1))
    state = sparse_dit.patch_state(pipe.transformer)
    layers = len(pipe.transformer.blocks)
    # 3 steps x 2 CFG passes x layers; the first 2 steps dense, the last sparse
    assert state.stats["dense_calls"] == 2 * 2 * layers
    assert state.stats["sparse_calls"] == 1 * 2 * layers
    assert state.step == 2
    sparse_dit.unpatch(pipe)
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames, ref)


def test_unsupported_model_names_supported_families():
    with pytest.raises(ValueError, match=r"supported family: wan \(WanTransformer3DModel\)"):
        sparse_dit.patch(torch.nn.Linear(2, 2), pattern="dense")


def test_unknown_pattern_lists_known(wan):
    with pytest.raises(ValueError, match=r"unknown pattern 'tiles'; known patterns: .*dense.*mask"):
        sparse_dit.patch(wan, pattern="tiles")
    assert not sparse_dit.is_patched(wan)


def test_mask_of_wrong_shape_says_expected_shape(wan):
    mask = torch.ones(1, 2, 5, 5, dtype=torch.bool)
    sparse_dit.patch(wan, pattern=PatternSpec("mask", block_mask=mask, block_size=16))
    with pytest.raises(ValueError, match=r"expected \(1, 1 or 2, 12, 12\) for seq_len=180 and block_size=16"):
        run(wan, wan_inputs())
    sparse_dit.unpatch(wan)


def test_bad_patch_arguments(wan):
    with pytest.raises(ValueError, match="either pattern= or profile="):
        sparse_dit.patch(wan, pattern="dense", profile="x.json")
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_dit.patch(wan, pattern="dense", backend="cuda")


def uniform_profile(pattern: PatternSpec, layers: int, heads: int, block_size: int):
    from sparse_dit.profile import HeadChoice, Profile

    header = {"model_class": "WanTransformer3DModel", "layers": layers, "heads": heads, "head_dim": 16, "block_size": block_size, "dense_above": 1.0}
    plan = [[[HeadChoice(pattern, 0.0, 0.5) for _ in range(heads)] for _ in range(layers)]]
    return Profile(header, [(0.0, 1.0)], plan)


def test_wan22_two_transformers_each_with_its_own_profile():
    from conftest import make_wan_pipeline
    from diffusers import WanPipeline

    base = make_wan_pipeline()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=base.vae,
        scheduler=base.scheduler,
        transformer=make_wan_transformer(seed=1),
        transformer_2=make_wan_transformer(seed=2),
        boundary_ratio=0.5,
    )
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        prompt_embeds=torch.randn(1, 7, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        height=48, width=80, num_frames=9, num_inference_steps=4, guidance_scale=2.0, output_type="latent",
    )
    ref = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
    tile = PatternSpec("tile", window=(1, 1, 1))
    profiles = {"transformer": uniform_profile(tile, 2, 2, 16), "transformer_2": uniform_profile(PatternSpec("dense"), 2, 2, 16)}
    sparse_dit.patch(pipe, profile=profiles)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
    high, low = sparse_dit.patch_state(pipe.transformer), sparse_dit.patch_state(pipe.transformer_2)
    assert high.stats["sparse_calls"] > 0 and high.stats["dense_calls"] == 0
    assert low.stats["sparse_calls"] == 0 and low.stats["dense_calls"] > 0
    assert not torch.equal(out, ref)
    # one step clock for both transformers: dense_steps counts steps of the whole generation
    sparse_dit.patch(pipe, pattern=tile, dense_steps=3, block_size=16)
    pipe(**kwargs, generator=torch.Generator().manual_seed(1))
    high, low = sparse_dit.patch_state(pipe.transformer), sparse_dit.patch_state(pipe.transformer_2)
    assert high.clock is low.clock and low.step == 3
    # steps 0-2 run on the high-noise transformer, inside the dense warm-up; step 3, the low-noise
    # transformer's first, is the fourth of the generation and so sparse (its own counter would say 0)
    assert high.stats["sparse_calls"] == 0 and high.stats["dense_calls"] == 3 * 2 * 2
    assert low.stats["sparse_calls"] == 1 * 2 * 2 and low.stats["dense_calls"] == 0
    sparse_dit.patch(pipe, profile=profiles)
    with pytest.raises(ValueError, match="no entry for this pipeline's WanTransformer3DModel"):
        sparse_dit.patch(pipe, profile={"transformer": profiles["transformer"]})
    sparse_dit.unpatch(pipe)
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames, ref)


def test_dynamic_pattern_state_is_shared_by_the_cfg_branches(wan, monkeypatch):
    """Wan calls the transformer once per CFG branch with the same timestep: one warm-start state per layer serves
    both, so only the very first call of each layer clusters from a cold start (held once, not per branch)."""
    from sparse_dit.patterns import kmeans

    starts = []
    real_warm = kmeans._warm

    def warm(*args):
        init = real_warm(*args)
        starts.append(init is not None)
        return init

    monkeypatch.setattr(kmeans, "_warm", warm)
    sparse_dit.patch(wan, pattern=PatternSpec("kmeans", top_p=0.8), block_size=16, backend="reference")
    x, _, text = wan_inputs(frames=3, height=6, width=10)
    with torch.no_grad():
        for t in (900, 900, 700, 700):
            wan(x, torch.tensor([t]), text if t % 2 else -text)
    state = sparse_dit.patch_state(wan)
    assert state.step == 1 and state.branch == 1
    assert len(state.layer_state) == len(wan.blocks)
    assert all(s[0]["q_centroids"] is not None for s in state.layer_state.values())
    per_call = 2  # q and k clustered per call
    assert len(starts) == 4 * len(wan.blocks) * per_call
    cold = [i for i, warm in enumerate(starts) if not warm]
    assert cold == list(range(len(wan.blocks) * per_call))  # the first call's layers only; branch 1 started warm
    sparse_dit.unpatch(wan)


def test_replan_every_reuses_dynamic_layouts_between_replans(wan):
    """replan_every=2: k-means runs on steps 0, 2, ... per CFG branch; steps in between reuse that layout
    (same object, centroids untouched); a new generation re-plans at its first step."""
    sparse_dit.patch(wan, pattern=PatternSpec("kmeans", top_p=0.8), block_size=16, backend="reference", replan_every=2)
    state = sparse_dit.patch_state(wan)
    x, _, text = wan_inputs(frames=3, height=6, width=10)
    seen = []
    with torch.no_grad():
        for t in (900, 800, 700, 600, 950):
            for branch_text in (text, -text):
                out = wan(x, torch.tensor([t]), branch_text, return_dict=False)[0]
                assert torch.isfinite(out).all()
            # the objects themselves, not ids: kept alive, so a freed layout's id cannot be reused
            entries = dict(state.dynamic_layouts)
            centroids = {key: s[0]["q_centroids"] for key, s in state.layer_state.items()}
            seen.append((state.step, entries, centroids))
    assert len(seen[0][1]) == 2 * len(wan.blocks)  # one layout per layer and CFG branch
    assert {built for _, built, _ in seen[0][1].values()} == {0}
    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[k][-1] is b[k][-1] for k in a)

    assert same(seen[1][1], seen[0][1])  # step 1 reuses step 0's layouts
    assert all(seen[1][2][k] is seen[0][2][k] for k in seen[0][2])  # and k-means did not run
    assert {built for _, built, _ in seen[2][1].values()} == {2}
    assert all(seen[2][1][k][-1] is not seen[1][1][k][-1] for k in seen[2][1])
    assert same(seen[3][1], seen[2][1])
    # t rises: a new generation at step 0 must not reuse the previous one's step-2 layout
    assert seen[4][0] == 0 and {built for _, built, _ in seen[4][1].values()} == {0}
    assert all(seen[4][1][k][-1] is not seen[3][1][k][-1] for k in seen[4][1])
    sparse_dit.unpatch(wan)


def test_replan_every_one_plans_every_step_and_bad_values_are_refused(wan):
    sparse_dit.patch(wan, pattern=PatternSpec("prune", keep_ratio=0.5, record=True), block_size=16, backend="reference")
    state = sparse_dit.patch_state(wan)
    x, _, text = wan_inputs(frames=3, height=6, width=10)
    kept = []
    with torch.no_grad():
        for t in (900, 800):
            wan(x, torch.tensor([t]), text)
            kept.append({key: s[0]["kept"] for key, s in state.layer_state.items()})
    # planned again on the second step (new selections), and no layout is held for reuse
    assert kept[0].keys() == kept[1].keys() and all(kept[0][k] is not kept[1][k] for k in kept[0])
    assert state.dynamic_layouts == {}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="replan_every must be an int >= 1"):
            sparse_dit.patch(wan, pattern="tile", replan_every=bad)
    sparse_dit.unpatch(wan)


def test_static_heads_of_a_mixed_layer_are_built_once(wan, monkeypatch):
    """A layer with tile and k-means heads re-plans k-means every step but builds its tile part only once."""
    from sparse_dit.patterns import tile

    builds = []
    real_build = tile.build
    monkeypatch.setattr(tile, "build", lambda *a, **kw: builds.append(1) or real_build(*a, **kw))
    sparse_dit.patch(wan, pattern=PatternSpec("kmeans", top_p=0.8), block_size=16, backend="reference")
    mixed = (PatternSpec("tile", window=(1, 2, 2)), PatternSpec("kmeans", top_p=0.8))  # head 0 tile, head 1 k-means
    sparse_dit.patch_state(wan).plan_source = lambda layer, t, step: mixed
    x, _, text = wan_inputs(frames=3, height=6, width=10)
    with torch.no_grad():
        for t in (900, 800, 700):
            out = wan(x, torch.tensor([t]), text, return_dict=False)[0]
            assert torch.isfinite(out).all()
    assert len(builds) == 1  # one geometry, one spec, one head count: shared by every layer and step
    assert sparse_dit.patch_state(wan).sparse_calls == 3 * len(wan.blocks)
    sparse_dit.unpatch(wan)


@pytest.mark.parametrize("dynamic_heads", [(0, 2, 4), (1, 2, 4)])
def test_dynamic_head_groups_plan_on_views_or_copies_alike(monkeypatch, dynamic_heads):
    """A mixed layer's k-means heads are handed to the planner as a strided view of q and k when they are evenly
    spaced (0, 2, 4 of 6: no copy) and as a gathered copy otherwise (1, 2, 4); either way the output equals the one
    from planning on contiguous copies of the same heads."""
    from sparse_dit.patterns import kmeans

    model = make_wan_transformer(heads=6, head_dim=16)
    km = PatternSpec("kmeans", top_p=0.8)
    plan = tuple(km if h in dynamic_heads else PatternSpec("tile", window=(1, 2, 2)) for h in range(6))
    x, _, text = wan_inputs(frames=3, height=6, width=10)
    real_build = kmeans.build
    seen = []

    def run(copy: bool) -> torch.Tensor:
        def build(*a, q, k, **kw):
            seen.append(q.is_contiguous())
            return real_build(*a, q=q.contiguous() if copy else q, k=k.contiguous() if copy else k, **kw)

        monkeypatch.setattr(kmeans, "build", build)
        sparse_dit.patch(model, pattern=km, block_size=16, backend="reference")
        sparse_dit.patch_state(model).plan_source = lambda layer, t, step: plan
        with torch.no_grad():
            out = model(x, torch.tensor([900]), text, return_dict=False)[0]
        sparse_dit.unpatch(model)
        return out

    planned_in_place = run(copy=False)
    strided = dynamic_heads == (0, 2, 4)
    assert seen and all(c is not strided for c in seen)  # a view of every other head is not contiguous
    torch.testing.assert_close(planned_in_place, run(copy=True), rtol=0, atol=0)
