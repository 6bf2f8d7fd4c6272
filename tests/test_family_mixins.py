"""What diffusers' model test mixins check, made on the patched model of every supported family (real diffusers
classes, small configs): gradient checkpointing gives the gradients of the plain backward, which equal the unpatched
model's with the same mask; a training step; save/load round trip; LoRA load and fuse (peft); attention-processor
get/set. Our own code, written against diffusers' public model API."""

from __future__ import annotations

import pytest
import torch
from model_builders import BUILDERS
from test_adapters import block_mask_for, install_explicit_mask, tokens_of

import sparse_dit
from sparse_dit import PatternSpec

BLOCK = 16
FAMILIES = sorted(BUILDERS)


def forward(model, kw, grad=False):
    with torch.set_grad_enabled(grad):
        return model(**kw, return_dict=False)[0]


def backward_grads(model, kw, checkpointing: bool) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    forward(model, kw, grad=True).square().mean().backward()
    model.eval()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, expected: dict, tol: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tol, atol=tol * 1e-2, msg=name)


def mask_pattern(family: str, model, grid, text_len):
    S = grid[0] * grid[1] * grid[2] + text_len
    heads = sparse_dit.pipelines.find_adapter(model).self_attention(model)[0].heads
    block_mask = block_mask_for(S, heads, seed=len(family))
    return block_mask, PatternSpec("mask", block_mask=block_mask, block_size=BLOCK)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_equals_plain_backward_and_the_unpatched_gradients(family):
    model, kw, grid, text_len = BUILDERS[family]()
    block_mask, spec = mask_pattern(family, model, grid, text_len)
    handles = install_explicit_mask(model, lambda s: tokens_of(block_mask, s))
    expected = backward_grads(model, kw, checkpointing=False)
    for h in handles:
        h.remove()
    sparse_dit.patch(model, pattern=spec, backend="reference")
    plain = backward_grads(model, kw, checkpointing=False)
    checkpointed = backward_grads(model, kw, checkpointing=True)
    assert_same_grads(plain, expected, tol=2e-4)
    assert_same_grads(checkpointed, plain, tol=1e-5)
    stats = sparse_dit.patch_state(model).stats
    assert stats["sparse_calls"] > 0 and stats["recomputed_calls"] == stats["sparse_calls"] / 2
    model.disable_gradient_checkpointing()
    sparse_dit.unpatch(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step(family):
    """One optimiser step of the dense-patched model is the unpatched model's step; a sparse-patched model trains
    (every parameter the unpatched model updates gets a finite gradient, and the loss goes down on a repeat)."""
    model, kw, grid, text_len = BUILDERS[family]()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step(m) -> dict[str, torch.Tensor]:
        optimiser = torch.optim.SGD(m.parameters(), lr=0.1)
        m.train()
        optimiser.zero_grad()
        forward(m, kw, grad=True).square().mean().backward()
        optimiser.step()
        m.eval()
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    def reset(m) -> None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(start[name])

    expected = step(model)
    reset(model)
    sparse_dit.patch(model, pattern="dense")
    got = step(model)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    reset(model)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    loss_before = forward(model, kw).square().mean()
    grads = backward_grads(model, kw, checkpointing=False)
    assert grads.keys() == {n for n in expected if not torch.equal(expected[n], start[n])} | grads.keys()
    assert all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in grads:
                p -= 0.05 * grads[name]
    assert forward(model, kw).square().mean() < loss_before
    sparse_dit.unpatch(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, tmp_path):
    """save_pretrained of a patched model writes the plain weights (no sparse-dit state); the loaded model is the
    unpatched original, and patching it again gives the patched output."""
    model, kw, grid, text_len = BUILDERS[family]()
    ref = forward(model, kw)
    keys = set(model.state_dict())
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    sparse = forward(model, kw)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert not sparse_dit.is_patched(loaded)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # (from_pretrained rebuilds some models' non-persistent buffers, e.g. RoPE tables, to within rounding)
    torch.testing.assert_close(forward(loaded, kw), ref, rtol=1e-5, atol=1e-6)
    sparse_dit.patch(loaded, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    torch.testing.assert_close(forward(loaded, kw), sparse, rtol=1e-5, atol=1e-6)
    assert sparse_dit.patch_state(loaded).stats["sparse_calls"] > 0
    assert torch.equal(forward(model, kw), sparse)  # saving left the patch in place
    sparse_dit.unpatch(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_add_save_load_and_fuse(family, tmp_path):
    """A LoRA adapter on the attention projections of a patched model: dense-patched equals unpatched with the same
    adapter; the adapter saved from the patched model loads into a fresh patched model; fusing keeps the output."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, kw, grid, text_len = BUILDERS[family]()
    sparse_dit.patch(model, pattern="dense")
    torch.manual_seed(7)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    with_lora = forward(model, kw)
    sparse_dit.unpatch(model)
    assert torch.equal(forward(model, kw), with_lora)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    sparse_lora = forward(model, kw)
    assert sparse_dit.patch_state(model).stats["sparse_calls"] > 0
    model.save_lora_adapter(tmp_path)

    fresh, _, _, _ = BUILDERS[family]()
    sparse_dit.patch(fresh, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    fresh.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    torch.testing.assert_close(forward(fresh, kw), sparse_lora, rtol=1e-5, atol=1e-5)
    fresh.fuse_lora()
    torch.testing.assert_close(forward(fresh, kw), sparse_lora, rtol=1e-4, atol=1e-4)
    fresh.unfuse_lora()
    fresh.unload_lora()
    sparse_dit.unpatch(fresh)
    sparse_dit.unpatch(model)


def get_processors(model) -> dict:
    if hasattr(model, "attn_processors"):
        return model.attn_processors
    # Mochi's transformer has no attn_processors/set_attn_processor: its attention modules' own processors
    return {f"{name}.processor": m.processor for name, m in model.named_modules() if getattr(m, "processor", None) is not None}


def set_processors(model, processors: dict) -> None:
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(dict(processors))  # (diffusers pops the entries of the dict it is given)
        return
    modules = dict(model.named_modules())
    for name, processor in processors.items():
        modules[name.removesuffix(".processor")].processor = processor


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_processors_get_and_set(family):
    """The processors of a patched model are diffusers' own; setting them (the same objects, or fresh instances of
    their classes) keeps the model patched with the same output; unpatch restores the unpatched output."""
    model, kw, grid, text_len = BUILDERS[family]()
    ref = forward(model, kw)
    before = get_processors(model)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=BLOCK, backend="reference")
    sparse = forward(model, kw)
    processors = get_processors(model)
    assert processors.keys() == before.keys() and all(processors[k] is before[k] for k in before)
    set_processors(model, processors)
    assert torch.equal(forward(model, kw), sparse)
    set_processors(model, {name: type(p)() for name, p in processors.items()})
    assert all(get_processors(model)[k] is not before[k] for k in before)
    state = sparse_dit.patch_state(model)
    calls = state.stats["sparse_calls"]
    assert torch.equal(forward(model, kw), sparse)
    assert state.stats["sparse_calls"] > calls and state.stats["dense_calls"] == 0
    sparse_dit.unpatch(model)
    assert torch.equal(forward(model, kw), ref)
