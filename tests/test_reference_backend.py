"""The CPU backend (`reference_attention`, gather method) against the masked oracle and masked SDPA.

Every check runs on fresh random layouts and inputs: the `gen` fixture draws a seed from the clock and prints
it (rerun one with SPARSE_DIT_TEST_SEED=<seed>). Layouts come from the helpers of test_kernel_triton.py
(random segments of any length, permutations with -1 slots, text keys first or last, dense text rows).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparse_dit.kernels.reference as reference
from sparse_dit.geometry import Geometry
from sparse_dit.kernels import block_sparse_attention
from sparse_dit.kernels.reference import masked_reference_attention, reference_attention
from sparse_dit.layout import Layout

from test_kernel_triton import gen, make_qkv, randint, random_block_mask, random_layout  # noqa: F401  (gen: fixture)
from test_layout import masked_sdpa

# tolerance on the relative L2 error against the float64 oracle, by input dtype: float16/bfloat16 results are
# rounded to the input dtype, the rest is float32/float64 accumulation order
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def oracle_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """(B, H, S) float64 log-sum-exp of the masked scores; -inf for rows without keys."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * scale
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)


def check(q, k, v, layout: Layout, scale: float | None = None) -> torch.Tensor:
    """Gather path vs masked oracle vs masked SDPA (float64), out and LSE; returns the gather output."""
    B, S, H, _ = q.shape
    got, got_lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
    ref, ref_lse = masked_reference_attention(q, k, v, layout, scale=scale, return_lse=True)
    assert got.shape == (B, S, H, v.shape[-1]) and got.dtype == q.dtype
    assert got_lse.shape == (B, H, S) and got_lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.isfinite(got).all(), "NaN/inf or unwritten output rows"
    mask = layout.to_dense_mask().expand(B, H, S, S)
    exact = masked_sdpa(q, k, v, mask, scale=scale)
    tol = TOL[q.dtype]
    assert rel_err(got, exact) < tol, f"gather vs masked SDPA: {rel_err(got, exact):.2e}"
    assert rel_err(ref, exact) < tol, f"masked oracle vs masked SDPA: {rel_err(ref, exact):.2e}"
    assert rel_err(got, ref) < tol
    expect_lse = oracle_lse(q, k, mask, scale)
    lse_tol = 1e-10 if q.dtype == torch.float64 else 1e-4
    for lse in (got_lse, ref_lse):
        assert torch.equal(torch.isneginf(lse), torch.isneginf(expect_lse))
        finite = torch.isfinite(expect_lse)
        assert float((lse.double() - expect_lse)[finite].abs().max()) < lse_tol
    return got


# ---------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize(
    "B,H,L,S,bq,dtype,kw",
    [
        (1, 1, 1, 64, 16, torch.float32, {}),  # S a multiple of the block
        (2, 3, 1, 100, 16, torch.float16, dict(q_perm=True, kv_perm=True)),  # ragged S, shared layout
        (3, 2, 3, 77, 32, torch.float64, dict(q_perm=True, kv_perm=True, text="first", dense=True)),
        (2, 2, 2, 130, 16, torch.float32, dict(text="last")),  # text keys, text rows sparse
        (3, 2, 1, 90, 24, torch.bfloat16, dict(q_perm=True, text="last", dense=True)),  # block not a power of 2
        (2, 4, 1, 150, 32, torch.float32, dict(kv_perm=True, text="first", max_segments=6)),
    ],
)
def test_matches_masked_oracle_and_sdpa(gen, B, H, L, S, bq, dtype, kw):
    layout = random_layout(gen, S, H, L, bq, **kw)
    q, k, v = make_qkv(gen, B, S, H, 32, dtype)
    check(q, k, v, layout)


@pytest.mark.parametrize("L", [1, 2])
def test_block_masks(gen, L):
    B, S, H, bq = 2, 200, 3, 16
    density = 0.1 + 0.5 * float(torch.rand(1, generator=gen))
    layout = Layout.from_block_mask(random_block_mask(gen, L, H, S, bq, density), bq, S)
    q, k, v = make_qkv(gen, B, S, H, 16, torch.float32)
    check(q, k, v, layout, scale=0.2)


def test_tile_layout_gathers_whole_tiles(gen):
    """A tile layout (what the reference model runs): segments are whole tiles in key order, so the plan moves
    keys a tile at a time, and shifted border windows share one key gather."""
    from sparse_dit.patterns import tile

    geo = Geometry(2, 3, 16, frames=4, height=8, width=16)
    layout = tile.build(geo, 3, 32, "cpu", window=(1, 1, 3), tile=(2, 4, 4))
    q, k, v = make_qkv(gen, 2, geo.seq_len, 3, 16, torch.float32, "transposed")
    check(q, k, v, layout)
    plan = next(val for key, val in layout._derived.items() if key[0] == "reference_gather_plan")
    assert plan.unit == 32  # one 2x4x4 tile
    assert any(b.rows > layout.block_q for b in plan.buckets)  # border blocks share a key list


def test_ragged_tile_grid(gen):
    """A grid that is not a multiple of the tile: partial tiles (-1 query slots, shorter key runs)."""
    from sparse_dit.patterns import tile

    geo = Geometry(1, 2, 16, frames=3, height=7, width=10)
    layout = tile.build(geo, 2, 32, "cpu", window=(2, 2, 2), tile=(2, 4, 4))
    assert layout.q_order_len > geo.seq_len
    q, k, v = make_qkv(gen, 2, geo.seq_len, 2, 16, torch.float16)
    check(q, k, v, layout)


def test_mixed_patterns_per_head(gen):
    """Dense, block-mask and permuted heads stacked into one layout, per-batch (L = B)."""
    B, S, bq = 2, 96, 16
    dense = Layout.dense(S, 1, block_q=bq)
    blocky = Layout.from_block_mask(random_block_mask(gen, 2, 2, S, bq, 0.3), bq, S)
    permuted = random_layout(gen, S, 1, 1, bq, q_perm=True, kv_perm=True)
    layout = Layout.stack_heads([dense, blocky, permuted])
    assert layout.heads == 4 and layout.batch == 2
    q, k, v = make_qkv(gen, B, S, 4, 32, torch.float32)
    out = check(q, k, v, layout)
    full = F.scaled_dot_product_attention(*(x[:, :, :1].transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert rel_err(out[:, :, :1], full) < TOL[torch.float32]


def test_shared_layout_equals_per_batch_copy_and_single_elements(gen):
    B, S, H, bq = 3, 70, 2, 16
    shared = random_layout(gen, S, H, 1, bq, q_perm=True, kv_perm=True, text="last", dense=True)
    stacked = Layout(
        S,
        bq,
        *(t.expand(B, *t.shape[1:]).contiguous() for t in (shared.kv_count, shared.kv_start, shared.kv_end)),
        q_perm=shared.q_perm.expand(B, -1, -1).contiguous(),
        kv_perm=shared.kv_perm.expand(B, -1, -1).contiguous(),
        text_kv=shared.text_kv,
        dense_q=shared.dense_q,
    )
    q, k, v = make_qkv(gen, B, S, H, 16, torch.float64)
    a = reference_attention(q, k, v, shared)
    torch.testing.assert_close(reference_attention(q, k, v, stacked), a, rtol=1e-13, atol=1e-13)
    for b in range(B):
        one = reference_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], shared)
        torch.testing.assert_close(one, a[b : b + 1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["transposed", "fused", "padded"])
def test_strided_views(gen, kind):
    B, S, H, D, bq = 2, 70, 2, 32, 16
    layout = random_layout(gen, S, H, 1, bq, q_perm=True, kv_perm=True)
    q, k, v = make_qkv(gen, B, S, H, D, torch.float32, kind)
    assert not q.is_contiguous()
    out = check(q, k, v, layout)
    # contiguous (B, S, H, D), the memory layout of CPU SDPA's output: compiled models see one stride pattern
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout))


def test_value_head_dim_differs(gen):
    B, S, H, bq = 2, 50, 2, 16
    layout = random_layout(gen, S, H, 1, bq, kv_perm=True, text="first", dense=True)
    q, k, _ = make_qkv(gen, B, S, H, 16, torch.float32)
    v = torch.randn(B, S, H, 24, generator=gen)
    out = check(q, k, v, layout)
    assert out.shape == (B, S, H, 24)


@pytest.mark.parametrize("chunk_bytes", [1, 20_000])
def test_chunking_and_merged_buckets(gen, monkeypatch, chunk_bytes):
    """One item per step, a few items per step, and buckets of unequal key counts (padded and masked) give the
    same result as the default plan."""
    B, S, H, bq = 2, 160, 3, 16
    layout = random_layout(gen, S, H, 2, bq, q_perm=True, kv_perm=True, text="last", max_segments=5)
    q, k, v = make_qkv(gen, B, S, H, 16, torch.float64)
    want, want_lse = reference_attention(q, k, v, layout, return_lse=True)
    got, got_lse = reference_attention(q, k, v, layout, return_lse=True, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(reference, "_MAX_EXACT_BUCKETS", 0)  # force buckets of unequal counts
    fresh = random_layout(gen, S, H, 2, bq, q_perm=True, kv_perm=True, text="last", max_segments=5)
    check(q, k, v, fresh)
    plan = next(val for key, val in fresh._derived.items() if key[0] == "reference_gather_plan")
    assert any(b.padded for b in plan.buckets)


# ------------------------------------------------------------------------------------ padded prompt keys
@pytest.mark.parametrize("case", ["text_kv", "in_segments", "perms"])
def test_padded_prompt_keys(gen, case):
    """``text_valid``: only the first text_valid[b] keys of text_range are real for batch element b."""
    B, S, H, bq, T = 2, 100, 2, 16, 20
    for _ in range(50):  # redraw until no row is left with only padded prompt keys
        if case == "text_kv":
            layout = random_layout(gen, S, H, 1, bq, text="last", dense=True, max_segments=3)
            text_range = layout.text_kv
        elif case == "in_segments":  # no text_kv: the prompt sits inside ordinary segments
            layout = random_layout(gen, S, H, 2, bq, max_segments=3)
            text_range = (S - T, S)
        else:
            layout = random_layout(gen, S, H, 1, bq, q_perm=True, kv_perm=True, text="first", dense=True, max_segments=3)
            text_range = layout.text_kv
        n = text_range[1] - text_range[0]
        text_valid = torch.tensor([randint(gen, 1, n - 1), n])
        layout = layout.with_text_valid(text_valid, text_range)
        if layout.to_dense_mask().any(-1).all():
            break
    else:
        raise AssertionError("could not draw a layout where every row keeps a real key")
    q, k, v = make_qkv(gen, B, S, H, 16, torch.float32)
    check(q, k, v, layout)


# ------------------------------------------------------------------------- contract: empty rows, poison
def unvalidated_layout_with_keyless_block() -> Layout:
    """Block 1 of 3 attends only -1 slots of kv_perm: no keys at all (validation would refuse it)."""
    S, bq = 48, 16
    kv_perm = torch.cat([torch.arange(S, dtype=torch.int32), torch.full((16,), -1, dtype=torch.int32)])[None, None]
    starts = torch.tensor([[[[0], [S], [0]]]], dtype=torch.int32)
    ends = torch.tensor([[[[S], [S + 16], [20]]]], dtype=torch.int32)
    return Layout(S, bq, torch.ones(1, 1, 3, dtype=torch.int32), starts, ends, kv_perm=kv_perm)


def test_rows_without_keys_are_zero(gen):
    layout = unvalidated_layout_with_keyless_block()
    q, k, v = (x.requires_grad_() for x in make_qkv(gen, 2, 48, 1, 16, torch.float32))
    for method in ("gather", "masked"):
        out, lse = reference_attention(q, k, v, layout, return_lse=True, method=method)
        assert torch.equal(out[:, 16:32].detach(), torch.zeros(2, 16, 1, 16))
        assert torch.isneginf(lse[:, :, 16:32]).all() and torch.isfinite(lse[:, :, :16]).all()
        grads = torch.autograd.grad(out.sum() + lse[:, :, :16].sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads), method
        assert torch.equal(grads[0][:, 16:32], torch.zeros(2, 16, 1, 16))  # key-less rows get no gradient
    check(q.detach(), k.detach(), v.detach(), layout)


def test_prompt_fully_padded_rows_are_zero(gen):
    """text_valid 0 for one batch element: its blocks that attend only text keys, and its dense text rows (the
    prompt is all they attend once segments are empty), have no keys."""
    S, H, bq = 64, 2, 16
    text_kv = (48, 64)
    nq = S // bq
    segs = [[[] if qb % 2 == 0 else [(0, 16)] for qb in range(nq)] for _ in range(H)]
    layout = Layout.from_segments([segs], S, bq, text_kv=text_kv).with_text_valid(torch.tensor([16, 0]))
    q, k, v = make_qkv(gen, 2, S, H, 8, torch.float64)
    mask = layout.to_dense_mask()
    empty = ~mask.any(-1)  # (B, H, S)
    assert empty[1].any() and not empty[0].any()
    for method in ("gather", "masked"):
        out, lse = reference_attention(q, k, v, layout, return_lse=True, method=method)
        assert torch.equal(out.transpose(1, 2)[empty], torch.zeros(int(empty.sum()), 8, dtype=torch.float64))
        assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    check(q, k, v, layout)


def test_nan_at_keys_nobody_attends(gen):
    """NaN/inf in K and V at padded prompt keys (attended by no row) change neither outputs nor gradients."""
    B, S, H, bq = 2, 90, 2, 16
    for _ in range(50):
        layout = random_layout(gen, S, H, 1, bq, q_perm=True, kv_perm=True, text="first", dense=True, max_segments=3)
        n = layout.text_kv[1] - layout.text_kv[0]
        layout = layout.with_text_valid(torch.tensor([randint(gen, 1, n - 1), n]))
        if layout.to_dense_mask().any(-1).all():
            break
    pad = layout.padded_text(0)
    clean = [x.double() for x in make_qkv(gen, B, S, H, 8, torch.float32)]
    poisoned = [x.clone() for x in clean]
    poisoned[1][0, pad[0] : pad[1]] = float("nan")
    poisoned[2][0, pad[0] : pad[1], 0] = float("inf")
    poisoned[2][0, pad[0] : pad[1], 1] = float("nan")
    weight = torch.randn(B, S, H, 8, generator=gen, dtype=torch.float64)
    for method in ("gather", "masked"):
        results = []
        for qkv in (clean, poisoned):
            leaves = [x.clone().requires_grad_() for x in qkv]
            out, lse = reference_attention(*leaves, layout, return_lse=True, method=method)
            grads = torch.autograd.grad((out * weight).sum() + lse.sum(), leaves)
            results.append((out, lse, grads))
        (out_c, lse_c, g_c), (out_p, lse_p, g_p) = results
        torch.testing.assert_close(out_p, out_c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse_p, lse_c, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_p, g_c):
            assert torch.isfinite(a).all(), method
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(g_p[1][0, pad[0] : pad[1]], torch.zeros_like(g_p[1][0, pad[0] : pad[1]]))


def test_nan_at_keys_a_row_does_not_attend(gen):
    """Poison every key that query block 0 of head 0 does not attend: the rows of that block are unchanged."""
    B, S, H, bq = 2, 120, 2, 16
    layout = random_layout(gen, S, H, 1, bq, q_perm=True, kv_perm=True, text="last", max_segments=3)
    q, k, v = make_qkv(gen, B, S, H, 16, torch.float32)
    rows = layout.query_rows(0, 0, torch.tensor([0]))[0]
    rows = rows[rows >= 0]
    attended = layout.key_mask(0, 0, torch.tensor([0]))[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, ~attended, 0] = float("nan")
    v2[:, ~attended, 0] = float("inf")
    for method in ("gather", "masked"):
        want = reference_attention(q, k, v, layout, method=method)
        got = reference_attention(q, k2, v2, layout, method=method)
        torch.testing.assert_close(got[:, rows, 0], want[:, rows, 0], rtol=1e-6, atol=1e-6)
        assert torch.isfinite(got[:, rows, 0]).all()


def test_poisoned_fresh_buffers(gen, monkeypatch):
    """Every output row is written: with torch.empty/empty_like handing out NaN-filled memory, nothing changes."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    B, S, H, bq = 2, 75, 3, 16
    layout = random_layout(gen, S, H, 1, bq, q_perm=True, kv_perm=True, text="last", dense=True)
    q, k, v = make_qkv(gen, B, S, H, 64, torch.float16)
    want = reference_attention(q, k, v, layout, return_lse=True)
    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    for method in ("gather", "masked"):
        out, lse = reference_attention(q, k, v, layout, return_lse=True, method=method)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), method
        assert rel_err(out, want[0]) < TOL[torch.float16]


# ------------------------------------------------------------------------------------------- gradients
def test_gradcheck_float64(gen):
    """torch.autograd.gradcheck of out, and of (out, lse), on a small case with every layout feature."""
    B, S, H, D, bq = 2, 14, 2, 3, 4
    for _ in range(50):
        layout = random_layout(gen, S, H, 2, bq, q_perm=True, kv_perm=True, text="last", dense=True, max_segments=2)
        layout = layout.with_text_valid(torch.tensor([2, 3]))
        if layout.to_dense_mask().any(-1).all():
            break
    q, k, v = (x.requires_grad_() for x in make_qkv(gen, B, S, H, D, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: reference_attention(a, b, c, layout), (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: reference_attention(a, b, c, layout, return_lse=True), (q, k, v), fast_mode=True
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_equal_masked_path(gen, dtype):
    B, S, H, bq = 2, 80, 3, 16
    layout = random_layout(gen, S, H, 2, bq, q_perm=True, kv_perm=True, text="first", dense=True, max_segments=4)
    inputs = make_qkv(gen, B, S, H, 16, dtype)
    weight = torch.randn(B, S, H, 16, generator=gen).to(dtype)
    lse_weight = torch.randn(B, H, S, generator=gen).to(dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for with_lse in (False, True):
        grads = {}
        for method in ("gather", "masked"):
            leaves = [x.clone().requires_grad_() for x in inputs]
            small_steps = dict(chunk_bytes=4096) if method == "gather" and with_lse else {}  # many steps
            out, lse = reference_attention(*leaves, layout, return_lse=True, method=method, **small_steps)
            loss = (out * weight).sum() + ((lse * lse_weight).sum() if with_lse else 0)
            grads[method] = torch.autograd.grad(loss, leaves)
        for a, b in zip(grads["gather"], grads["masked"]):
            torch.testing.assert_close(a, b, **tol)


def test_half_inputs_get_float32_gradients_in_their_dtype(gen):
    B, S, H, bq = 1, 40, 2, 16
    layout = random_layout(gen, S, H, 1, bq, kv_perm=True)
    q, k, v = (x.requires_grad_() for x in make_qkv(gen, B, S, H, 16, torch.bfloat16))
    out = reference_attention(q, k, v, layout)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


# ---------------------------------------------------------------------------------------------- plumbing
def test_default_backend_and_methods(gen):
    B, S, H, bq = 1, 40, 2, 16
    layout = random_layout(gen, S, H, 1, bq)
    q, k, v = make_qkv(gen, B, S, H, 16, torch.float32)
    assert torch.equal(block_sparse_attention(q, k, v, layout), reference_attention(q, k, v, layout, method="gather"))
    with pytest.raises(ValueError, match="method must be one of"):
        reference_attention(q, k, v, layout, method="bogus")


def test_plan_is_cached_per_layout_and_batch(gen):
    S, H, bq = 40, 2, 16
    layout = random_layout(gen, S, H, 1, bq, q_perm=True)
    for B in (1, 2, 2):
        q, k, v = make_qkv(gen, B, S, H, 8, torch.float32)
        reference_attention(q, k, v, layout)
    plans = [key for key in layout._derived if key[0] == "reference_gather_plan"]
    assert sorted(key[1] for key in plans) == [1, 2]


def test_cpu_benchmark_script_runs(tmp_path):
    """benchmarks/cpu_backend.py on a tiny grid: every case timed and written as a markdown row."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_backend.py"
    out = tmp_path / "cpu_backend.md"
    args = ["--grids", "2x8x8", "--densities", "0.3", "0.6", "--repeats", "1", "--block", "16", "--heads", "2",
            "--head-dim", "16", "--out", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 2x8x8 |")]
    assert len(rows) == 2 and all(row.rstrip().endswith("x |") for row in rows)
