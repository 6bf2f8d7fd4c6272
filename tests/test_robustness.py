"""A patched model accepts everything the unpatched one does (issue 13): gradient checkpointing, Ctrl-C, threads,
copies and pickles, attention-backend switches, Flux Kontext and layered QwenImage inputs, stats for every call,
bounded memory, torch.export. Real diffusers classes with small configs; the reference backend."""

from __future__ import annotations

import copy
import functools
import io
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import make_wan_transformer, wan_inputs
from test_adapters import install_explicit_mask

import sparse_dit
from sparse_dit import Layout, PatternSpec

BLOCK = 16


def run(model, x, t, text, grad=False):
    with torch.set_grad_enabled(grad):
        return model(x, t, text, return_dict=False)[0]


def interceptors_on_stack() -> list:
    from sparse_dit.patching import _AttentionInterceptor

    return [m for m in torch.overrides._get_current_function_mode_stack() if isinstance(m, _AttentionInterceptor)]


def param_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ 1. gradient checkpointing
def wan_grads(model, x, t, text, checkpointing: bool, reentrant: bool = False) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    if checkpointing and reentrant:  # torch's older checkpoint: the forward runs under no_grad, backward re-runs it
        model.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    elif checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    out = run(model, x, t, text, grad=True)
    out.square().mean().backward()
    return out.detach(), param_grads(model)


KMEANS = PatternSpec("kmeans", top_p=0.5, q_clusters=4, k_clusters=8)


@pytest.mark.parametrize(
    "pattern,reentrant", [("dense", False), (PatternSpec("tile", window=(1, 1, 1)), False), (KMEANS, False), (KMEANS, True)]
)
def test_gradient_checkpointing_recomputes_the_forward_exactly(pattern, reentrant):
    """Backward re-runs each block after the forward finished: the recomputation replays the forward's decisions
    (for k-means, whose state moved on after the forward, the exact layout), so gradients equal those without
    checkpointing."""
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    sparse_dit.patch(model, pattern=pattern, block_size=BLOCK, backend="reference")
    out, plain = wan_grads(model, x, t, text, checkpointing=False)
    sparse_dit.patch(model, pattern=pattern, block_size=BLOCK, backend="reference")  # fresh k-means state
    out_ckpt, ckpt = wan_grads(model, x, t, text, checkpointing=True, reentrant=reentrant)
    assert torch.equal(out, out_ckpt)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    stats = sparse_dit.patch_state(model).stats
    assert stats["recomputed_calls"] == len(model.blocks)  # each block's attention recomputed once, not recounted
    assert stats["sparse_calls"] + stats["dense_calls"] == len(model.blocks)
    sparse_dit.unpatch(model)


def test_gradients_equal_the_unpatched_model_with_the_same_mask():
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    S, heads = 180, 2
    nb = -(-S // BLOCK)
    g = torch.Generator().manual_seed(3)
    block_mask = (torch.rand(1, heads, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
    token_mask = block_mask[0][:, torch.arange(S) // BLOCK][:, :, torch.arange(S) // BLOCK]
    handles = install_explicit_mask(model, lambda s: token_mask)
    _, expected = wan_grads(model, x, t, text, checkpointing=True)
    for h in handles:
        h.remove()
    sparse_dit.patch(model, pattern=PatternSpec("mask", block_mask=block_mask, block_size=BLOCK), backend="reference")
    _, got = wan_grads(model, x, t, text, checkpointing=True)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    sparse_dit.unpatch(model)


def test_forward_only_triton_kernel_is_never_chosen_when_gradients_are_needed(monkeypatch):
    from sparse_dit import kernels
    from sparse_dit.patching import choose_backend

    q = torch.zeros(1, 4, 2, 16)
    assert choose_backend("triton", q, needs_grad=False) == ("triton", None)
    backend, warning = choose_backend("triton", q, needs_grad=True)
    assert backend == "reference" and "forward-only" in warning
    monkeypatch.setattr(kernels, "triton_supported", lambda q: True)  # as on a supported GPU
    assert choose_backend("auto", q, needs_grad=False) == ("triton", None)
    assert choose_backend("auto", q, needs_grad=True)[0] == "reference"
    monkeypatch.setattr(kernels, "triton_supported", lambda q: False)
    assert choose_backend("auto", q, needs_grad=True) == ("auto", None)
    assert choose_backend("reference", q, needs_grad=True) == ("reference", None)


def test_training_a_triton_patched_model_warns_once_and_has_gradients():
    """backend="triton" with gradients needed runs the differentiable reference (one warning), never a kernel
    without backward; the model trains as with backend="reference"."""
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    tile = PatternSpec("tile", window=(1, 1, 1))
    sparse_dit.patch(model, pattern=tile, block_size=BLOCK, backend="reference")
    _, expected = wan_grads(model, x, t, text, checkpointing=False)
    sparse_dit.patch(model, pattern=tile, block_size=BLOCK, backend="triton")
    with pytest.warns(UserWarning, match="Triton kernel is forward-only") as caught:
        _, got = wan_grads(model, x, t, text, checkpointing=False)
        wan_grads(model, x, t, text, checkpointing=False)
    assert sum("forward-only" in str(w.message) for w in caught) == 1
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    sparse_dit.unpatch(model)


# ----------------------------------------------------------------------------------------- 2. Ctrl-C
class _InterruptInside(Exception):
    pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt, _InterruptInside])
def test_interrupt_inside_attention_leaves_no_trace(exc):
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    ref = run(model, x, t, text)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    sparse = run(model, x, t, text)

    def interrupt(*_):
        raise exc()

    handle = model.blocks[1].attn1.to_out[0].register_forward_pre_hook(interrupt)  # inside the patched module
    with pytest.raises(exc):
        run(model, x, t, text)
    handle.remove()
    # unrelated attention in this thread is plain SDPA again, whatever was left behind
    q, k, v = torch.randn(3, 1, 2, 7, 8).unbind(0)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v)
    assert torch.equal(run(model, x, t, text), sparse)  # the next patched call is unaffected
    assert interceptors_on_stack() == []
    with pytest.raises(exc):
        handle = model.blocks[0].attn1.to_out[0].register_forward_pre_hook(interrupt)
        try:
            run(model, x, t, text)
        finally:
            handle.remove()
    sparse_dit.unpatch(model)
    assert interceptors_on_stack() == []  # unpatch clears what an interrupted forward left
    assert torch.equal(run(model, x, t, text), ref)


# ---------------------------------------------------------------------------------------- 3. threads
def test_concurrent_generations_in_threads_equal_sequential_ones():
    """Two threads run denoising loops on one patched model in lock step: each sees its own step clock
    (dense_steps) and dynamic pattern state, so every output equals the same loop run alone."""
    model = make_wan_transformer()
    sparse_dit.patch(model, pattern=PatternSpec("kmeans", top_p=0.6, q_clusters=4, k_clusters=8), block_size=BLOCK,
                     backend="reference", dense_steps=2)
    x, _, text = wan_inputs()
    loops = {"a": (900, 700, 500), "b": (950, 600, 300)}

    def generate(name: str, barrier: threading.Barrier | None, out: dict) -> None:
        results = []
        for step_t in loops[name]:
            if barrier is not None:
                barrier.wait()
            results.append(run(model, x, torch.tensor([step_t]), text if name == "a" else -text))
        out[name] = results

    sequential: dict = {}
    for name in loops:
        generate(name, None, sequential)
        sparse_dit.patch(model, pattern=PatternSpec("kmeans", top_p=0.6, q_clusters=4, k_clusters=8), block_size=BLOCK,
                         backend="reference", dense_steps=2)  # fresh state for the next loop
    concurrent: dict = {}
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=generate, args=(name, barrier, concurrent)) for name in loops]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for name in loops:
        for got, want in zip(concurrent[name], sequential[name]):
            assert torch.equal(got, want), name
    stats = sparse_dit.patch_state(model).stats
    assert (stats["sparse_calls"], stats["dense_calls"]) == (2 * 1 * 2, 2 * 2 * 2)
    sparse_dit.unpatch(model)


# ---------------------------------------------------------------------------------- 4. copies and pickles
def test_deepcopy_carries_its_own_patch():
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    ref = run(model, x, t, text)
    ref_800, ref_700 = (run(model, x, torch.tensor([step_t]), text) for step_t in (800, 700))
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference", dense_steps=1)
    run(model, x, torch.tensor([900]), text)
    ema = copy.deepcopy(model)
    original, copied = sparse_dit.patch_state(model), sparse_dit.patch_state(ema)
    assert copied is not None and copied is not original
    assert all(m1 is not m2 for m1, m2 in zip(original.modules, copied.modules))
    assert all(any(m is c for c in ema.modules()) for m in copied.modules)
    before = original.stats
    dense = run(ema, x, torch.tensor([800]), text)  # the copy's own step 0: dense_steps=1 makes it dense
    assert original.stats == before and original.clock.last_timestep == pytest.approx(0.9)
    assert copied.stats["dense_calls"] == before["dense_calls"] + len(ema.blocks)
    assert torch.equal(dense, ref_800)
    assert not torch.allclose(run(ema, x, torch.tensor([700]), text), ref_700, atol=1e-4)  # its step 1: sparse
    sparse_dit.unpatch(ema)
    assert sparse_dit.is_patched(model) and not sparse_dit.is_patched(ema)
    assert torch.equal(run(ema, x, t, text), ref)
    assert sum(len(b.attn1._forward_pre_hooks) for b in model.blocks) == len(model.blocks)
    sparse_dit.unpatch(model)
    assert torch.equal(run(model, x, t, text), ref)


def test_pickled_patched_model_unpickles_patched():
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    ref = run(model, x, t, text)
    nb = -(-180 // BLOCK)
    mask = (torch.rand(1, 2, nb, nb, generator=torch.Generator().manual_seed(0)) < 0.3) | torch.eye(nb, dtype=torch.bool)
    sparse_dit.patch(model, pattern=PatternSpec("mask", block_mask=mask, block_size=BLOCK), backend="reference")
    sparse = run(model, x, t, text)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    state = sparse_dit.patch_state(loaded)
    assert state is not None and state.adapter.family == "wan" and state.installed
    assert torch.equal(run(loaded, x, t, text), sparse)
    assert state.stats["sparse_calls"] == 2 * len(loaded.blocks)  # counted on since the save: 1 call before, 1 after
    sparse_dit.unpatch(loaded)
    assert torch.equal(run(loaded, x, t, text), ref)
    sparse_dit.unpatch(model)


# ----------------------------------------------------------------------------------- 5. backend switches
def test_set_attention_backend_after_patch_keeps_sparse_and_unpatch_restores_it():
    """A backend that does not call SDPA (flex) chosen after `patch`: sparse-dit keeps serving the self-attention, its
    dense calls run on the user's choice, and unpatch leaves the user's latest choice in place."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    x, t, text = wan_inputs()
    model = make_wan_transformer()
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    sparse = run(model, x, t, text)
    model.set_attention_backend("flex")  # the user switches while patched
    state = sparse_dit.patch_state(model)
    calls = state.stats["sparse_calls"]
    # still sparse (only the unpatched cross-attention changed backend: a rounding-level difference)
    torch.testing.assert_close(run(model, x, t, text), sparse, rtol=1e-5, atol=1e-5)
    assert state.stats["sparse_calls"] == calls + len(model.blocks)
    sparse_dit.unpatch(model)
    assert {b.attn1.processor._attention_backend for b in model.blocks} == {AttentionBackendName.FLEX}
    ref_flex = run(model, x, t, text)
    sparse_dit.patch(model, pattern="dense")
    assert torch.equal(run(model, x, t, text), ref_flex)  # dense calls run on the user's backend
    model.set_attention_backend("native")
    sparse_dit.unpatch(model)  # no call in between: the latest choice still wins
    assert {b.attn1.processor._attention_backend for b in model.blocks} == {AttentionBackendName.NATIVE}


def test_set_attn_processor_under_a_global_backend_keeps_sparse():
    from diffusers.models.attention_dispatch import attention_backend
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    x, t, text = wan_inputs()
    model = make_wan_transformer()
    ref = run(model, x, t, text)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    sparse = run(model, x, t, text)
    with attention_backend("flex"):  # a global backend that does not call SDPA
        model.set_attn_processor(WanAttnProcessor())
        state = sparse_dit.patch_state(model)
        calls = state.stats["sparse_calls"]
        # sparse as before (the unpatched cross-attention now runs on the global backend: rounding-level changes)
        torch.testing.assert_close(run(model, x, t, text), sparse, rtol=1e-5, atol=1e-5)
        assert state.stats["sparse_calls"] == calls + len(model.blocks)
    sparse_dit.unpatch(model)
    assert all("_attention_backend" not in vars(b.attn1.processor) for b in model.blocks)
    assert torch.equal(run(model, x, t, text), ref)


def test_processors_that_call_sdpa_themselves_stay_on_sdpa_for_dense_calls():
    """CogVideoX's processor calls SDPA whatever diffusers backend is active: its dense calls must too (a dense-patched
    model equals the unpatched one under a global flex backend)."""
    from diffusers.models.attention_dispatch import attention_backend
    from model_builders import cogvideox

    model, kw, _, _ = cogvideox()
    with attention_backend("flex"), torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        sparse_dit.patch(model, pattern="dense")
        assert torch.equal(model(**kw, return_dict=False)[0], ref)
    sparse_dit.unpatch(model)


# ---------------------------------------------------------------------------------------- 7. stats
class HandWrittenProcessor:
    """Wan self-attention without RoPE or norms, calling SDPA with ``sdpa_kwargs`` (or doing softmax by hand)."""

    def __init__(self, sdpa_kwargs: dict | None = None, use_sdpa: bool = True):
        self.sdpa_kwargs = sdpa_kwargs or {}
        self.use_sdpa = use_sdpa

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        return attn.to_out[0](out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize(
    "processor,reason",
    [
        (HandWrittenProcessor({"attn_mask": torch.rand(180, 180, generator=torch.Generator().manual_seed(0)) < 0.7}),
         "attention mask other than prompt padding"),
        (HandWrittenProcessor({"is_causal": True}), "causal"),
        (HandWrittenProcessor(use_sdpa=False), "processor did not call scaled_dot_product_attention"),
    ],
)
def test_every_self_attention_call_is_counted_with_its_reason(processor, reason):
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    for block in model.blocks:
        block.attn1.set_processor(processor)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    if processor.use_sdpa:
        run(model, x, t, text)
    else:
        with pytest.warns(UserWarning, match="does not call torch.nn.functional.scaled_dot_product_attention"):
            run(model, x, t, text)
    stats = sparse_dit.patch_state(model).stats
    assert stats["sparse_calls"] == 0 and stats["dense_calls"] == len(model.blocks)
    assert stats["dense_reasons"] == {reason: len(model.blocks)}
    sparse_dit.unpatch(model)


def test_dense_calls_say_why():
    x, _, text = wan_inputs()
    model = make_wan_transformer()
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference", dense_steps=1)
    for step_t in (900, 800):
        run(model, x, torch.tensor([step_t]), text)
    stats = sparse_dit.patch_state(model).stats
    assert stats["dense_reasons"] == {"dense_steps": 2} and stats["sparse_calls"] == 2
    sparse_dit.patch(model, pattern="dense")
    run(model, x, torch.tensor([900]), text)
    assert sparse_dit.patch_state(model).stats["dense_reasons"] == {"dense pattern": 2}
    sparse_dit.unpatch(model)


# --------------------------------------------------------------------------------------- 10. memory
def test_density_of_padded_prompt_layouts_is_exact_without_an_s_by_s_mask(monkeypatch):
    g = torch.Generator().manual_seed(0)
    S, block, heads = 75, 16, 3
    nb = -(-S // block)
    cases = []
    for L in (1, 2):
        mask = (torch.rand(L, heads, nb, nb, generator=g) < 0.4) | torch.eye(nb, dtype=torch.bool)
        lay = Layout.from_block_mask(mask, block, S, text_kv=(64, 75), dense_q=(64, 75))
        cases.append(lay.with_text_valid(torch.tensor([3, 11], dtype=torch.int32), (64, 75)))
    no_text_kv = Layout.from_block_mask(torch.ones(1, heads, nb, nb, dtype=torch.bool), block, S)
    cases.append(no_text_kv.with_text_valid(torch.tensor([0, 5], dtype=torch.int32), (64, 75)))
    expected = [lay.to_dense_mask().double().mean((-1, -2)) for lay in cases]

    def refuse(*_args, **_kwargs):
        raise AssertionError("density must not build an S x S mask")

    monkeypatch.setattr(Layout, "to_dense_mask", refuse)
    for lay, want in zip(cases, expected):
        torch.testing.assert_close(lay.density_per_head(), want)


def test_layout_caches_are_bounded():
    model = make_wan_transformer()
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    state = sparse_dit.patch_state(model)
    state.layout_cache.maxsize = 2
    for grid in ((1, 4, 4), (2, 4, 4), (3, 4, 4), (1, 6, 4)):
        x, t, text = wan_inputs(frames=grid[0], height=grid[1], width=grid[2])
        run(model, x, t, text)
    assert len(state.layout_cache) == 2
    assert [k[1].grid for k in state.layout_cache] == [(3, 4, 4), (1, 6, 4)]
    sparse_dit.unpatch(model)


def test_padded_prompt_variants_are_bounded():
    from model_builders import hunyuan

    model, kw, _, _ = hunyuan()
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    state = sparse_dit.patch_state(model)
    state._text_valid_layouts.maxsize = 3
    with torch.no_grad():
        for n in range(1, 7):
            mask = (torch.arange(7) < n).long().expand(2, 7)
            model(**{**kw, "encoder_attention_mask": mask})
    assert len(state._text_valid_layouts) == 3
    sparse_dit.unpatch(model)


# ---------------------------------------------------------------------------------------- 11. export
def test_export_of_a_dense_patched_model_and_a_clear_refusal_for_sparse():
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    ref = run(model, x, t, text)
    sparse_dit.patch(model, pattern="dense")
    exported = torch.export.export(model, (x, t, text))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x, t, text)[0], ref)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK)
    with pytest.raises(RuntimeError, match="torch.export of a model patched with sparse patterns is not supported"):
        torch.export.export(model, (x, t, text))
    assert interceptors_on_stack() == []
    sparse_dit.unpatch(model)
    assert torch.equal(run(model, x, t, text), ref)


# ------------------------------------------------------------------- 6. Flux Kontext, layered QwenImage
def flux_kontext():
    """Flux.1 Kontext's call: a 6x10 latent grid (ids (0, row, column)) followed by a 4x6 reference image (ids
    (1, row, column)), as FluxKontextPipeline concatenates them."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)

    def ids(index, h, w):
        out = torch.zeros(h, w, 3)
        out[..., 0], out[..., 1], out[..., 2] = index, torch.arange(h)[:, None], torch.arange(w)[None]
        return out.reshape(-1, 3)

    img_ids = torch.cat([ids(0, 6, 10), ids(1, 4, 6)])
    kw = dict(hidden_states=torch.randn(1, 84, 4, generator=g), encoder_hidden_states=torch.randn(1, 7, 16, generator=g),
              pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), img_ids=img_ids,
              txt_ids=torch.zeros(7, 3))
    return model, kw, 7, 60, 24


def qwen_layered():
    """QwenImage-Layered's call: two 6x10 layers and a 4x6 condition image per prompt (layer-3D RoPE), padded prompts."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
                                        use_layer3d_rope=True, use_additional_t_cond=True).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(2, 144, 16, generator=g), encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
              encoder_hidden_states_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]),
              timestep=torch.tensor([0.5, 0.5]), img_shapes=[[(1, 6, 10), (1, 6, 10), (1, 4, 6)]] * 2,
              additional_t_cond=torch.tensor([0, 0]))
    return model, kw, 7, 60, 84


@pytest.mark.parametrize("build", [flux_kontext, qwen_layered])
def test_extra_image_tokens_are_attended_like_text(build, monkeypatch):
    """The leading grid gets the plan; the other image tokens are always-attended keys and dense queries. The patched
    output equals the unpatched model run with that token mask (and its own prompt-padding mask)."""
    from sparse_dit import kernels

    model, kw, T, V, E = build()
    S = T + V + E
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        sparse_dit.patch(model, pattern="dense")
        assert torch.equal(model(**kw, return_dict=False)[0], ref)
        layouts = []
        real = kernels.reference_attention
        monkeypatch.setattr(kernels, "reference_attention", lambda q, k, v, layout, **a: layouts.append(layout) or real(q, k, v, layout, **a))
        sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
        out = model(**kw, return_dict=False)[0]
    state = sparse_dit.patch_state(model)
    assert state.stats["sparse_calls"] == len(state.modules) and state.stats["dense_calls"] == 0
    geometry = state.last_geometry
    assert geometry.grid == (1, 6, 10) and geometry.text_len == T + E and geometry.text_position == "first"
    layout = layouts[0]
    order = torch.cat([torch.arange(T + V, S), torch.arange(T), torch.arange(T, T + V)])  # [extra, text, grid]
    inverse = order.argsort()
    token_mask = layout.with_text_valid(None).to_dense_mask()[0][:, inverse][:, :, inverse]  # diffusers' order
    extra = torch.arange(T + V, S)
    assert token_mask[:, extra].all() and token_mask[:, :, extra].all()
    assert not token_mask[:, T : T + V, T : T + V].all(), "the grid part is sparse"
    sparse_dit.unpatch(model)
    handles = install_explicit_mask(model, lambda s: token_mask)
    with torch.no_grad():
        expected = model(**kw, return_dict=False)[0]
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, expected, rtol=5e-5, atol=5e-5)


def test_flux_ids_that_form_no_grid_run_dense_and_are_counted():
    """diffusers' own Flux tests pass random image ids: the unpatched model accepts them, so the patched one runs
    them dense (one warning) instead of refusing."""
    from model_builders import flux

    model, kw, _, _ = flux()
    kw["img_ids"] = torch.randn(kw["img_ids"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
        sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
        with pytest.warns(UserWarning, match="no grid"):
            out = model(**kw, return_dict=False)[0]
    assert torch.equal(out, ref)
    stats = sparse_dit.patch_state(model).stats
    assert stats["dense_reasons"] == {"no video grid for this call": 2} and stats["sparse_calls"] == 0
    sparse_dit.unpatch(model)
