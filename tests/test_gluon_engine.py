"""The optional Gluon engine (sparse_dit/kernels/gluon_attention.py): imports without a GPU, is unavailable on CPU,
says why a call is unsupported, its host side (tables, gathers, ragged lengths, empty query blocks, lse, provided
outputs) around a torch stand-in for the kernel, and the kernel itself on a Hopper GPU (skipped elsewhere)."""

from __future__ import annotations

import math

import pytest
import torch

import sparse_dit.kernels.fa4 as fa4
import sparse_dit.kernels.gluon_attention as ge
from sparse_dit import Layout
from sparse_dit.kernels.reference import reference_attention
from test_fa4_engine import permuted  # the same permuted layouts as the FA4 engine's tests


def random_block_mask(L: int, H: int, nb: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(L, H, nb, nb, generator=g) < density
    idx = torch.arange(nb)
    mask[:, :, idx, idx] = True
    return mask


def emptied(lay: Layout, empty: int) -> Layout:
    """``lay`` with its first ``empty`` query blocks keeping no key (built unvalidated: `Layout.validate` refuses
    such blocks, but the engine must still give zeros and lse -inf for them, as for padding query blocks)."""
    count = lay.kv_count.clone()
    count[:, :, :empty] = 0
    return Layout(lay.seq_len, lay.block_q, count, lay.kv_start, lay.kv_end)


def qkv(B: int, S: int, H: int, D: int = 128, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3))


def check_lse(got, ref, return_lse: bool, tol: float):
    """With ``return_lse``: the engine's lse has the reference's -inf rows and equals it elsewhere (within ``tol``);
    returns the two outputs without their lse."""
    if not return_lse:
        return got, ref
    (got, got_lse), (ref, ref_lse) = got, ref
    fin = ref_lse.isfinite()
    assert torch.equal(got_lse.isfinite(), fin)
    torch.testing.assert_close(got_lse[fin], ref_lse[fin].float(), atol=tol, rtol=tol)
    return got, ref


# ------------------------------------------------------------------------------------------------- CPU side
def test_imports_and_is_unavailable_without_a_hopper_gpu():
    assert callable(ge.gluon_block_sparse_attention)
    if not torch.cuda.is_available():
        assert ge.gluon_available() is False
    assert isinstance(ge.gluon_available(), bool)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("head_dim_64", "head dim 64"),
        ("float32", "float16 or bfloat16"),
        ("block_q_64", "query blocks of 64"),
        ("block_q_256", "query blocks of 256"),
        ("padded_keys", "not aligned"),
        ("cpu", "CUDA device of compute capability 9.0"),
    ],
)
def test_supported_gives_a_reason(case, reason):
    S, H = 1000, 2
    q, _, _ = qkv(1, S, H)
    lay = Layout.from_block_mask(random_block_mask(1, H, 8, 0.3, seed=1), 128, S)
    if case == "head_dim_64":
        q = q[..., :64]
    elif case == "float32":
        q = q.float()
    elif case == "block_q_64":
        lay = Layout.from_block_mask(random_block_mask(1, H, 16, 0.3, seed=1), 64, S)
    elif case == "block_q_256":
        lay = Layout.from_block_mask(random_block_mask(1, H, 4, 0.5, seed=1), 256, S)
    elif case == "padded_keys":
        lay = permuted(lay, seed=0, kv_pad=24)
    elif case == "cpu" and ge.gluon_device_ok(q):
        pytest.skip("q is on a device the engine supports")
    out = ge.gluon_sparse_supported(q, lay)
    assert isinstance(out, str) and reason in out, out


def test_call_refuses_other_head_dims_dtypes_and_devices():
    S, H = 1000, 2
    lay = Layout.from_block_mask(random_block_mask(1, H, 8, 0.3, seed=1), 128, S)
    q, k, v = qkv(1, S, H, D=64)
    with pytest.raises(ValueError, match="head dim 128"):
        ge.gluon_block_sparse_attention(q, k, v, lay)
    q, k, v = qkv(1, S, H, dtype=torch.float32)
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        ge.gluon_block_sparse_attention(q, k, v, lay)
    q, k, v = qkv(1, S, H)
    if not ge.gluon_device_ok(q):
        with pytest.raises(RuntimeError, match="capability 9.0"):
            ge.gluon_block_sparse_attention(q, k, v, lay)


def _stand_in_launch(calls):
    """The kernel's contract in torch: per (b, h, query block) the listed 128-key blocks (keys >= Sk dropped),
    out rows < Sq written (0 for an empty block), lse natural log (-inf for an empty block)."""

    def launch(q, k, v, out, lse, cnt, idx, scale, persistent=True):
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        L, _, NQ, W = idx.shape
        assert NQ == -(-Sq // 128) and out.shape == (B, Sq, H, D) and out.is_contiguous()
        calls.append(dict(Sq=Sq, Sk=Sk, L=L, lse=lse is not None, persistent=persistent))
        used = torch.arange(W) < cnt[..., None].long()
        blocks = torch.zeros(L, H, NQ, -(-Sk // 128) + 1, dtype=torch.bool)
        blocks.scatter_(-1, torch.where(used, idx.long(), blocks.shape[-1] - 1), True)
        tok = blocks[..., :-1].repeat_interleave(128, 2)[:, :, :Sq].repeat_interleave(128, 3)[..., :Sk]
        tok = tok.expand(B, H, Sq, Sk)
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        s = s.masked_fill(~tok, float("-inf"))
        m = s.amax(-1, keepdim=True).clamp(min=-1e30)
        p = torch.exp(s - m)
        l_ = p.sum(-1, keepdim=True)
        o = torch.einsum("bhqk,bkhd->bqhd", p / l_.clamp(min=1e-30), v.float())
        out.copy_(o.to(out.dtype))
        if lse is not None:
            lse.copy_(torch.where(l_[..., 0] > 0, (m + l_.log())[..., 0], float("-inf")))

    return launch


@pytest.mark.parametrize(
    "kind, S, B, L",
    [("mask", 1000, 2, 1), ("mask", 1000, 2, 2), ("mask", 1024, 1, 1), ("empty", 1000, 2, 2), ("perm", 1000, 2, 1)],
)
@pytest.mark.parametrize("return_lse", [False, True])
def test_host_side_equals_the_reference_around_a_stand_in(monkeypatch, kind, S, B, L, return_lse):
    H = 3
    nb = -(-S // 128)
    lay = Layout.from_block_mask(random_block_mask(L, H, nb, 0.3, seed=S + L), 128, S)
    if kind == "empty":
        lay = emptied(lay, 2)
    if kind == "perm":
        lay = permuted(lay, seed=1)
    calls: list = []
    monkeypatch.setattr(ge, "gluon_device_ok", lambda q: True)
    monkeypatch.setattr(ge, "_launch", _stand_in_launch(calls))
    q, k, v = qkv(B, S, H, dtype=torch.float16, seed=2)
    assert ge.gluon_sparse_supported(q, lay) is True
    got = ge.gluon_block_sparse_attention(q, k, v, lay, return_lse=return_lse)
    ref = reference_attention(q, k, v, lay, return_lse=return_lse)
    got, ref = check_lse(got, ref, return_lse, tol=1e-3)
    assert got.shape == (B, S, H, 128) and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert calls and calls[0]["L"] == L and calls[0]["lse"] == return_lse
    if kind == "perm":
        assert calls[0]["Sq"] == 1024  # the query order padded to whole blocks
    if kind == "empty":
        assert bool((got[:, :256] == 0).all())


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_grid_by_default(monkeypatch, persistent):
    S, B, H = 1000, 1, 2
    lay = Layout.from_block_mask(random_block_mask(1, H, 8, 0.4, seed=3), 128, S)
    calls = []
    monkeypatch.setattr(ge, "gluon_device_ok", lambda q: True)
    monkeypatch.setattr(ge, "_launch", _stand_in_launch(calls))
    q, k, v = qkv(B, S, H, dtype=torch.float16, seed=4)
    ge.gluon_block_sparse_attention(q, k, v, lay)
    ge.gluon_block_sparse_attention(q, k, v, lay, persistent=persistent)
    assert calls[0]["persistent"] is True and calls[1]["persistent"] is persistent


def test_provided_outputs_are_written(monkeypatch):
    S, B, H = 1000, 2, 2
    lay = Layout.from_block_mask(random_block_mask(1, H, 8, 0.4, seed=3), 128, S)
    monkeypatch.setattr(ge, "gluon_device_ok", lambda q: True)
    monkeypatch.setattr(ge, "_launch", _stand_in_launch([]))
    q, k, v = qkv(B, S, H, dtype=torch.float16, seed=4)
    out = torch.full((B, S, H, 128), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, S), float("nan"))
    o, l_ = ge.gluon_block_sparse_attention(q, k, v, lay, return_lse=True, out=out, lse=lse)
    assert o.data_ptr() == out.data_ptr() and l_.data_ptr() == lse.data_ptr()
    assert bool(out.isfinite().all()) and bool(lse.isfinite().all())


@pytest.mark.parametrize("permute_q", [False, True])
def test_bad_provided_outputs_are_refused_before_any_work(monkeypatch, permute_q):
    """Wrong out/lse are refused whether or not the layout permutes queries (the permuted path copies into them)."""
    S, B, H = 1000, 1, 2
    lay = Layout.from_block_mask(random_block_mask(1, H, 8, 0.4, seed=3), 128, S)
    if permute_q:
        lay = permuted(lay, seed=5)
    calls = []
    monkeypatch.setattr(ge, "gluon_device_ok", lambda q: True)
    monkeypatch.setattr(ge, "_launch", _stand_in_launch(calls))
    q, k, v = qkv(B, S, H, dtype=torch.float16, seed=4)
    for bad in (torch.empty(B, S, H, 128), torch.empty(B, S, H, 128, dtype=q.dtype).transpose(1, 2).contiguous().transpose(1, 2)):
        with pytest.raises(ValueError, match="out must be"):
            ge.gluon_block_sparse_attention(q, k, v, lay, out=bad)
    with pytest.raises(ValueError, match="lse must be"):
        ge.gluon_block_sparse_attention(q, k, v, lay, return_lse=True, lse=torch.empty(B, H, S, dtype=torch.float16))
    assert not calls


def test_only_the_triton_release_it_was_written_for_counts_as_available(monkeypatch):
    """Gluon's API moves between Triton releases and compiles lazily: another release is unavailable, with a reason."""
    monkeypatch.setattr(ge, "_triton_release", lambda: "3.9")
    assert ge.gluon_import_error() is not None and "3.9" in ge.gluon_import_error()
    assert ge._gluon_importable() is False and ge.gluon_available() is False
    monkeypatch.setattr(ge, "_triton_release", lambda: "3.6")
    assert ge.gluon_import_error() is None or "3.6" not in ge.gluon_import_error()


def test_tables_are_fa4s():
    S, H = 1000, 2
    lay = Layout.from_block_mask(random_block_mask(2, H, 8, 0.3, seed=5), 128, S)
    blocks = ge._layout_reason(lay)
    assert isinstance(blocks, fa4.Fa4Blocks) and blocks is fa4.fa4_blocks(lay)


# ------------------------------------------------------------------------------------------------- GPU
def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not ge.gluon_available():
        return f"the Gluon engine is not available here ({ge.gluon_import_error() or 'not a capability 9.0 GPU'})"
    return None


@pytest.mark.parametrize("S, B, L, dtype, return_lse", [(1000, 2, 2, torch.bfloat16, True), (4096, 1, 1, torch.float16, False)])
def test_gluon_engine_equals_the_reference_on_the_gpu(S, B, L, dtype, return_lse):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    H = 3
    nb = -(-S // 128)
    lay = emptied(Layout.from_block_mask(random_block_mask(L, H, nb, 0.3, seed=7).cuda(), 128, S), 1)
    q, k, v = (t.cuda() for t in qkv(B, S, H, dtype=dtype, seed=8))
    with torch.no_grad():
        got = ge.gluon_block_sparse_attention(q, k, v, lay, return_lse=return_lse)
        ref = reference_attention(q, k, v, lay, return_lse=return_lse)
    got, ref = check_lse(got, ref, return_lse, tol=2e-2)
    scale = ref.float().abs().max().item()
    assert (got.float() - ref.float()).abs().max().item() < 2e-2 * max(scale, 1e-6) + 1e-3
    assert math.isfinite(got.float().abs().max().item())


@pytest.mark.parametrize("S, B, L, return_lse", [(1000, 2, 2, True), (4173, 1, 1, False)])
def test_persistent_kernel_equals_the_per_block_kernel_on_the_gpu(S, B, L, return_lse):
    """Same arithmetic in the same order per query block: outputs (and lse) bit-identical, also with ragged S, empty
    query blocks and more query blocks than SMs (B H NQ > 132 at S=4173, H=40)."""
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    H = 40 if S > 4000 else 3
    nb = -(-S // 128)
    lay = emptied(Layout.from_block_mask(random_block_mask(L, H, nb, 0.3, seed=9).cuda(), 128, S), 2)
    q, k, v = (t.cuda() for t in qkv(B, S, H, dtype=torch.bfloat16, seed=10))
    with torch.no_grad():
        a = ge.gluon_block_sparse_attention(q, k, v, lay, return_lse=return_lse, persistent=True)
        b = ge.gluon_block_sparse_attention(q, k, v, lay, return_lse=return_lse, persistent=False)
    for x, y in zip(a if return_lse else (a,), b if return_lse else (b,)):
        assert torch.equal(x, y)


def test_patched_wan_on_the_gluon_engine_equals_triton_on_the_gpu():
    """A real (small) Wan transformer patched with the packed tile (whole 128-key blocks) under backend="gluon" runs
    its sparse calls on the Gluon engine and gives the output of backend="triton" (bf16 rounding apart)."""
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    import sparse_dit
    from conftest import make_wan_transformer, wan_inputs

    model = make_wan_transformer(heads=2, head_dim=128, layers=2).cuda().to(torch.bfloat16)
    x, t, text = (a.cuda() for a in wan_inputs(frames=4, height=16, width=32))  # 2048 tokens, tiles 2 x 8 x 8
    x, text = x.to(torch.bfloat16), text.to(torch.bfloat16)
    outs, calls = {}, {}
    for backend in ("triton", "gluon"):
        # (checked on the CPU: a layout of whole 128-key blocks at density 0.19, which `fa4_blocks` converts)
        sparse_dit.patch(model, pattern={"name": "tile", "window": (1, 1, 3), "packed": True}, block_size=128,
                         backend=backend)
        try:
            with torch.no_grad():
                outs[backend] = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            calls[backend] = dict(sparse_dit.patch_state(model).engines.calls)
        finally:
            sparse_dit.unpatch(model)
    assert calls["gluon"]["gluon"] == 2 and calls["triton"]["gluon"] == 0, calls
    ref = outs["triton"].float()
    assert (outs["gluon"].float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item() + 1e-3
