"""Dense calls of a patched model (dense pattern, warm-up steps, fall-backs) run on the fastest dense attention:
the user's diffusers backend if they chose one, else FA4 when it can run the call, else SDPA. FA4's availability
is monkeypatched (CPU), and FA4 itself replaced by SDPA that records its calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_wan_transformer, wan_inputs

import sparse_dit
import sparse_dit.kernels as kernels
import sparse_dit.kernels.fa4 as fa4
from sparse_dit import PatternSpec


@pytest.fixture
def fake_fa4(monkeypatch) -> list:
    """FA4 'available' for every call, computed by SDPA; returns the list of (B, S, H, D) shapes it ran."""
    calls: list = []

    def dense(q, k, v, scale=None, causal=False):
        calls.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, is_causal=causal)
        return out.transpose(1, 2)

    monkeypatch.setattr(fa4, "fa4_dense_supported", lambda q, k, v: True)
    monkeypatch.setattr(fa4, "fa4_dense_attention", dense)
    return calls


def qkv(B=1, H=2, S=64, D=16, Sk=None, Hk=None, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, D, generator=g, requires_grad=grad)
    k = torch.randn(B, Hk or H, Sk or S, D, generator=g)
    v = torch.randn(B, Hk or H, Sk or S, D, generator=g)
    return q, k, v


def test_dense_engine_rules(fake_fa4):
    q, k, v = qkv()
    assert kernels.dense_engine(q, k, v) == "fa4"
    assert kernels.dense_engine(q, k, v, is_causal=True) == "fa4"
    assert kernels.dense_engine(q, k, v, attn_mask=torch.ones(64, 64, dtype=torch.bool)) == "sdpa"
    assert kernels.dense_engine(q, k, v, dropout_p=0.1) == "sdpa"
    qs, ks, vs = qkv(Sk=32)
    assert kernels.dense_engine(qs, ks, vs) == "fa4"  # cross-attention lengths
    assert kernels.dense_engine(qs, ks, vs, is_causal=True) == "sdpa"  # SDPA's causal is top-left aligned
    qg, kg, vg = qkv(H=4, Hk=2)
    assert kernels.dense_engine(qg, kg, vg) == "sdpa"
    assert kernels.dense_engine(qg, kg, vg, enable_gqa=True) == "fa4"
    qr, kr, vr = qkv(grad=True)
    assert kernels.dense_engine(qr, kr, vr) == "sdpa"  # FA4 runs inference calls only
    with torch.no_grad():
        assert kernels.dense_engine(qr, kr, vr) == "fa4"


def test_dense_engine_without_fa4_is_sdpa(monkeypatch):
    monkeypatch.setattr(fa4, "fa4_interface", lambda: None)
    q, k, v = qkv()
    assert not fa4.fa4_dense_supported(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert kernels.dense_engine(q, k, v) == "sdpa"
    assert torch.equal(kernels.dense_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_dense_attention_on_fa4_keeps_sdpa_layout(fake_fa4):
    q, k, v = qkv(S=48, D=8)
    out = kernels.dense_attention(q, k, v, scale=0.3)
    assert fake_fa4 == [(1, 48, 2, 8)]  # FA4 got (B, S, H, D)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    kernels.dense_attention(q, k, v, attn_mask=torch.ones(48, 48, dtype=torch.bool))
    assert len(fake_fa4) == 1  # a masked call stays on SDPA


def run(model, x, t, text):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def test_dense_calls_of_a_patched_model_run_on_fa4(fake_fa4):
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    ref = run(model, x, t, text)
    # pattern="dense" is the identity patch: bit-identical to the unpatched model, so its SDPA, never FA4
    sparse_dit.patch(model, pattern="dense")
    assert torch.equal(run(model, x, t, text), ref)
    assert fake_fa4 == []
    # the dense warm-up steps of a sparse plan go to the fastest dense kernel
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=16, backend="reference", dense_steps=1)
    out = run(model, x, t, text)
    assert len(fake_fa4) == len(model.blocks)  # every self-attention; the unpatched cross-attention stays diffusers'
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sparse_dit.patch_state(model).stats["dense_reasons"] == {"dense_steps": len(model.blocks)}
    sparse_dit.unpatch(model)


@pytest.mark.parametrize("backend", ["_native_math", "native"])
def test_the_users_backend_is_honoured(fake_fa4, backend):
    """A backend the user set (diffusers' own; an explicit "native" means torch's SDPA as it is) runs the dense calls:
    FA4 is not used and the output equals the unpatched model's on that backend."""
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    model.set_attention_backend(backend)
    ref = run(model, x, t, text)
    sparse_dit.patch(model, pattern="dense")
    assert torch.equal(run(model, x, t, text), ref)
    assert fake_fa4 == []
    sparse_dit.unpatch(model)


def test_a_global_backend_is_honoured(fake_fa4):
    from diffusers.models.attention_dispatch import attention_backend

    x, t, text = wan_inputs()
    model = make_wan_transformer()
    with attention_backend("_native_math"):
        ref = run(model, x, t, text)
        sparse_dit.patch(model, pattern="dense")
        assert torch.equal(run(model, x, t, text), ref)
    assert fake_fa4 == []
    sparse_dit.unpatch(model)


def test_patch_accepts_the_fa4_backend_and_runs_anywhere():
    """backend="fa4" prefers the FA4 engine on a GPU; where there is none it is "auto" (here: the reference)."""
    x, t, text = wan_inputs()
    model = make_wan_transformer()
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=16, backend="reference")
    ref = run(model, x, t, text)
    sparse_dit.patch(model, pattern=PatternSpec("tile", window=(1, 1, 1)), block_size=16, backend="fa4")
    state = sparse_dit.patch_state(model)
    assert state.engines.prefer == "fa4"
    torch.testing.assert_close(run(model, x, t, text), ref)  # CPU: the reference backend
    sparse_dit.unpatch(model)
