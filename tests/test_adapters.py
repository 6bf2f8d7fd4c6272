"""Every supported model family, on the real diffusers transformer class with a small config and an odd grid:
dense equals unpatched; a random block layout equals the unpatched model run with an explicit mask built
here; unpatch restores bit-identical output; padded prompt keys are attended by nobody."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_builders import BUILDERS
from torch.overrides import TorchFunctionMode

import sparse_dit
from sparse_dit import PatternSpec
from sparse_dit.pipelines import find_adapter

BLOCK = 16


def run(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out


class ExplicitMask(TorchFunctionMode):
    """While active inside the self-attention modules, AND a token mask into every SDPA call's mask.

    token_mask(S) -> (H, S, S) bool for the call's sequence length; the model's own (key-padding) mask,
    if any, is kept by combining both.
    """

    def __init__(self, token_mask):
        super().__init__()
        self.token_mask = token_mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            S = bound["query"].shape[-2]
            mask = self.token_mask(S)[None]
            own = bound.get("attn_mask")
            if own is not None:
                own = own if own.dtype == torch.bool else own > -1e3
                mask = mask & own
            bound["attn_mask"] = mask
            return func(**bound)
        return func(*args, **kwargs)


def install_explicit_mask(model, token_mask):
    modules = find_adapter(model).self_attention(model)
    mode = ExplicitMask(token_mask)
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda *_: (mode.__enter__(), None)[1]))
        handles.append(m.register_forward_hook(lambda *_: (mode.__exit__(None, None, None), None)[1], always_call=True))
    return handles


def block_mask_for(S: int, heads: int, seed: int) -> torch.Tensor:
    nb = -(-S // BLOCK)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, heads, nb, nb, generator=g) < 0.35
    mask |= torch.eye(nb, dtype=torch.bool)
    return mask


def tokens_of(block_mask: torch.Tensor, S: int) -> torch.Tensor:
    idx = torch.arange(S) // BLOCK
    return block_mask[0][:, idx][:, :, idx]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_family_dense_mask_and_unpatch(family):
    model, kwargs, grid, text_len = BUILDERS[family]()
    assert find_adapter(model).family == family
    ref = run(model, kwargs)

    sparse_dit.patch(model, pattern="dense")
    assert (run(model, kwargs) - ref).abs().max().item() <= 1e-6
    geometry = sparse_dit.patch_state(model).last_geometry
    assert geometry.grid == grid
    assert geometry.text_len == text_len
    sparse_dit.unpatch(model)

    S = grid[0] * grid[1] * grid[2] + text_len
    heads = geometry.heads
    block_mask = block_mask_for(S, heads, seed=len(family))
    handles = install_explicit_mask(model, lambda s: tokens_of(block_mask, s))
    expected = run(model, kwargs)
    for h in handles:
        h.remove()
    assert not torch.allclose(expected, ref, atol=1e-4), "the mask must change the output"
    assert torch.equal(run(model, kwargs), ref), "the test's own hooks must be gone"

    sparse_dit.patch(model, pattern=PatternSpec("mask", block_mask=block_mask, block_size=BLOCK), backend="reference")
    out = run(model, kwargs)
    state = sparse_dit.patch_state(model)
    assert state.stats["sparse_calls"] > 0 and state.stats["dense_calls"] == 0
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=5e-5)

    sparse_dit.unpatch(model)
    assert torch.equal(run(model, kwargs), ref)


@pytest.mark.parametrize("family", ["hunyuan-video", "qwenimage"])
def test_padded_prompt_keys_are_attended_by_nobody(family):
    """Changing what sits in padded prompt slots must not change the patched output (as unpatched)."""
    model, kwargs, grid, text_len = BUILDERS[family]()
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    out = run(model, kwargs)
    mask_name = "encoder_attention_mask" if "encoder_attention_mask" in kwargs else "encoder_hidden_states_mask"
    pad = kwargs[mask_name] == 0
    assert pad.any()
    noisy = dict(kwargs)
    noisy["encoder_hidden_states"] = torch.where(pad[..., None], torch.randn_like(kwargs["encoder_hidden_states"]) * 10, kwargs["encoder_hidden_states"])
    torch.testing.assert_close(run(model, noisy), out, atol=1e-5, rtol=1e-5)
    layout_calls = sparse_dit.patch_state(model).stats["sparse_calls"]
    assert layout_calls > 0
    sparse_dit.unpatch(model)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_family_runs_every_static_pattern(family):
    model, kwargs, grid, text_len = BUILDERS[family]()
    for pattern in (PatternSpec("tile", window=(1, 1, 1)), PatternSpec("radial", decay=0.5)):
        sparse_dit.patch(model, pattern=pattern, block_size=BLOCK, backend="reference")
        out = run(model, kwargs)
        assert torch.isfinite(out).all()
        state = sparse_dit.patch_state(model)
        assert state.stats["sparse_calls"] > 0
        assert 0 < state.stats["density_sum"] / state.stats["sparse_calls"] <= 1
    sparse_dit.unpatch(model)


def test_sd35_dual_attention_layers_are_patched_too():
    from model_builders import sd3

    model, kwargs, grid, text_len = sd3(dual_attention_layers=(0,))
    modules = find_adapter(model).self_attention(model)
    assert len(modules) == 3 and modules[1] is model.transformer_blocks[0].attn2
    ref = run(model, kwargs)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    out = run(model, kwargs)
    assert sparse_dit.patch_state(model).stats["sparse_calls"] == 3
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    sparse_dit.unpatch(model)
    assert torch.equal(run(model, kwargs), ref)
