"""The Triton block-sparse attention kernel, run on the CPU under the Triton interpreter.

Every check compares against `reference_attention` and against an explicitly masked
`scaled_dot_product_attention` built from `layout.to_dense_mask()`, on fresh random inputs: each test draws
a seed from the clock and prints it (rerun one with SPARSE_DIT_TEST_SEED=<seed>). The interpreter computes
bf16 dots wrongly, so only float16 and float32 run here; bf16 is checked on the GPU by benchmarks/kernel.py.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from sparse_dit.kernels.reference import reference_attention  # noqa: E402
from sparse_dit.kernels.triton_attention import (  # noqa: E402
    SUPPORTED_HEAD_DIMS,
    _build_chunk_tables,
    triton_block_sparse_attention,
)
from sparse_dit.layout import Layout  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def gen(request) -> torch.Generator:
    seed = int(os.environ.get("SPARSE_DIT_TEST_SEED", time.time_ns() % (2**31)))
    print(f"[{request.node.name}] seed={seed} (rerun with SPARSE_DIT_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def make_qkv(gen, B, S, H, D, dtype, kind="contiguous"):
    """q, k, v (B, S, H, D), as plain tensors or as strided views of bigger tensors."""
    if kind == "contiguous":
        return [torch.randn(B, S, H, D, generator=gen).to(dtype) for _ in range(3)]
    if kind == "transposed":  # views of (B, H, S, D) tensors, as attention processors often hold them
        return [torch.randn(B, H, S, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(3)]
    if kind == "fused":  # slices of one fused qkv projection (B, S, 3, H, D)
        qkv = torch.randn(B, S, 3, H, D, generator=gen).to(dtype)
        return [qkv[:, :, i] for i in range(3)]
    if kind == "padded":  # head dim sliced out of a wider buffer, seq strided by 2
        big = torch.randn(3, B, 2 * S, H, D + 8, generator=gen).to(dtype)
        return [big[i, :, ::2, :, 4 : 4 + D] for i in range(3)]
    raise ValueError(kind)


def sdpa_masked(q, k, v, layout, scale=None):
    """Dense attention with the layout's (L, H, S, S) token mask, in float32."""
    mask = layout.to_dense_mask()
    t = lambda x: x.float().transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(q, k, v, layout, scale=None, **kw):
    """Run the kernel (poisoned outputs) and compare out and LSE with the reference and masked SDPA."""
    B, S, H, D = q.shape
    out = torch.full((B, S, H, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, S), float("nan"), dtype=torch.float32)
    got, got_lse = triton_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, out=out, lse=lse, **kw)
    assert got is out and got_lse is lse
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} output elements unwritten or NaN"
    assert torch.isfinite(got_lse).all(), "LSE has unwritten or NaN rows"
    ref, ref_lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
    tol = TOL[q.dtype]
    err = rel_err(got, ref)
    assert err < tol, f"relative error vs reference {err:.2e} >= {tol:.0e}"
    assert (got.float() - ref.float()).abs().max() < 10 * tol * max(1.0, float(ref.float().abs().max()))
    lse_err = float((got_lse - ref_lse).abs().max())
    assert lse_err < 1e-3, f"LSE max error {lse_err:.2e}"
    dense = sdpa_masked(q, k, v, layout, scale)
    err2 = rel_err(got, dense)
    assert err2 < 2 * tol, f"relative error vs masked SDPA {err2:.2e}"
    return got


def random_perm_with_padding(gen, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """The given tokens in random order with -1 slots scattered among them, `length` entries in all."""
    n_pad = length - tokens.numel()
    assert n_pad >= 0
    items = torch.cat([tokens, torch.full((n_pad,), -1, dtype=tokens.dtype)])
    return items[torch.randperm(length, generator=gen)]


def random_segments(gen, lo: int, hi: int, max_segments: int, allow_empty: bool):
    """Disjoint random segments of arbitrary lengths inside [lo, hi), in random order."""
    n = randint(gen, 0 if allow_empty else 1, max_segments)
    n = min(n, (hi - lo) // 2) if hi - lo >= 2 else min(n, 1)
    if n == 0:
        return []
    cuts = torch.randperm(hi - lo + 1, generator=gen)[: 2 * n].sort().values + lo
    segs = [(int(cuts[2 * i]), int(cuts[2 * i + 1])) for i in range(n)]
    segs = [s for s in segs if s[1] > s[0]]
    return [segs[i] for i in torch.randperm(len(segs), generator=gen).tolist()]


def random_layout(gen, S, H, L, block_q, **kw):
    """A layout with random segments of any length; optional permutations with -1 padding, a text range
    (at the start or at the end) whose rows may attend densely. Redrawn until every query has a real key
    (a query block whose segments hold only padding slots of kv_perm attends nothing; validation refuses it)."""
    for _ in range(50):
        try:
            layout = _random_layout(gen, S, H, L, block_q, **kw)
        except ValueError as err:  # validation refuses a block whose segments hold only padding slots
            if "attends no keys" not in str(err):
                raise
            continue
        if layout.to_dense_mask().any(-1).all():
            return layout
    raise AssertionError("could not draw a layout where every query has a key")


def _random_layout(gen, S, H, L, block_q, *, q_perm=False, kv_perm=False, text=None, dense=False, max_segments=4):
    text_kv = None
    if text is not None:
        T = randint(gen, 3, max(3, S // 5))
        text_kv = (0, T) if text == "first" else (S - T, S)
    dense_q = text_kv if dense else None
    video = torch.ones(S, dtype=torch.bool)
    if text_kv is not None:
        video[text_kv[0] : text_kv[1]] = False
    video_tokens = video.nonzero()[:, 0].to(torch.int32)

    q_perms = kv_perms = None
    if q_perm:
        nq_len = (-(-S // block_q) + randint(gen, 0, 2)) * block_q  # longer than S: padded with -1
        q_perms = torch.stack([
            torch.stack([random_perm_with_padding(gen, torch.arange(S, dtype=torch.int32), nq_len) for _ in range(H)])
            for _ in range(L)
        ])
    q_len = q_perms.shape[-1] if q_perms is not None else S
    NQ = -(-q_len // block_q)
    if kv_perm:
        n_pad = randint(gen, 1, 20)
        body = video_tokens.numel() + n_pad
        kv_perms = []
        for _ in range(L):
            per_h = []
            for _ in range(H):
                p = random_perm_with_padding(gen, video_tokens, body)
                if text_kv is not None:  # text keys may sit in the key order too, outside every segment
                    p = torch.cat([p, torch.arange(*text_kv, dtype=torch.int32)])
                per_h.append(p)
            kv_perms.append(torch.stack(per_h))
        kv_perms = torch.stack(kv_perms)
        seg_lo, seg_hi = 0, body
    elif text_kv is None:
        seg_lo, seg_hi = 0, S
    elif text == "first":
        seg_lo, seg_hi = text_kv[1], S
    else:
        seg_lo, seg_hi = 0, text_kv[0]
    segments = [
        [[random_segments(gen, seg_lo, seg_hi, max_segments, allow_empty=text_kv is not None) for _ in range(NQ)] for _ in range(H)]
        for _ in range(L)
    ]
    return Layout.from_segments(segments, S, block_q, q_perm=q_perms, kv_perm=kv_perms, text_kv=text_kv, dense_q=dense_q)


def random_block_mask(gen, L, H, S, block, density):
    nb = -(-S // block)
    mask = torch.rand(L, H, nb, nb, generator=gen) < density
    mask[..., torch.arange(nb), torch.arange(nb)] = True  # every block keeps at least its own keys
    return mask


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
    "B,H,S,D,block,L,dtype",
    [
        (1, 1, 64, 16, 16, 1, torch.float32),  # S a multiple of the block
        (2, 2, 100, 32, 16, 1, torch.float16),  # S not a multiple of the block, shared layout
        (2, 3, 77, 64, 32, 2, torch.float16),  # per-batch layout, 3 heads
        (1, 2, 150, 32, 32, 1, torch.float32),
    ],
)
def test_block_mask(gen, B, H, S, D, block, L, dtype):
    density = 0.1 + 0.6 * float(torch.rand(1, generator=gen))
    layout = Layout.from_block_mask(random_block_mask(gen, L, H, S, block, density), block, S)
    q, k, v = make_qkv(gen, B, S, H, D, dtype)
    check(q, k, v, layout)


def test_dense_layout_and_scale(gen):
    B, S, H, D = 2, 90, 2, 32
    layout = Layout.dense(S, H, block_q=32)
    q, k, v = make_qkv(gen, B, S, H, D, torch.float32)
    out = check(q, k, v, layout, scale=0.3)
    full = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.3).transpose(1, 2)
    assert rel_err(out, full) < 1e-5


@pytest.mark.parametrize("L", [1, 2])
def test_random_segments_any_length(gen, L):
    B, S, H, D, bq = 2, 130, 2, 32, 16
    layout = random_layout(gen, S, H, L, bq, max_segments=5)
    assert layout.batch == L
    q, k, v = make_qkv(gen, B, S, H, D, torch.float16)
    check(q, k, v, layout)


@pytest.mark.parametrize("permute", ["fused", "separate", "kv_copy"])
def test_permutations_with_padding(gen, permute):
    B, S, H, D, bq = 2, 110, 2, 32, 16
    layout = random_layout(gen, S, H, 2, bq, q_perm=True, kv_perm=True)
    assert layout.q_order_len > S and (layout.q_perm == -1).any() and (layout.kv_perm == -1).any()
    q, k, v = make_qkv(gen, B, S, H, D, torch.float32)
    check(q, k, v, layout, permute=permute)


@pytest.mark.parametrize("which", ["q", "kv"])
def test_one_sided_permutation(gen, which):
    B, S, H, D, bq = 1, 80, 2, 16, 16
    layout = random_layout(gen, S, H, 1, bq, q_perm=which == "q", kv_perm=which == "kv")
    q, k, v = make_qkv(gen, B, S, H, D, torch.float16)
    a = check(q, k, v, layout, permute="fused")
    b = check(q, k, v, layout, permute="separate")
    c = check(q, k, v, layout, permute="kv_copy")
    assert rel_err(a, b) < 2e-3 and rel_err(a, c) < 2e-3


@pytest.mark.parametrize(
    "text,dense,perms,permute",
    [
        ("last", True, False, "fused"),
        ("first", False, False, "fused"),
        ("first", True, True, "fused"),
        ("last", True, True, "separate"),
        ("last", True, True, "kv_copy"),
    ],
)
def test_text_keys_and_dense_rows(gen, text, dense, perms, permute):
    B, S, H, D, bq = 2, 120, 2, 32, 16
    layout = random_layout(gen, S, H, 1, bq, q_perm=perms, kv_perm=perms, text=text, dense=dense, max_segments=3)
    q, k, v = make_qkv(gen, B, S, H, D, torch.float16)
    out = check(q, k, v, layout, permute=permute)
    if dense:  # text rows are full attention over every key
        a, b = layout.dense_q
        full = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        assert rel_err(out[:, a:b], full[:, a:b]) < 2e-3


def test_text_only_blocks(gen):
    """Query blocks with an empty segment list (only text keys) and blocks with a single one-block segment."""
    B, S, H, D, bq = 1, 96, 2, 16, 16
    text_kv = (80, 96)
    nq = S // bq
    segs = [[[] if qb % 2 == 0 else [(qb * bq - bq, qb * bq)] for qb in range(nq)] for _ in range(H)]
    layout = Layout.from_segments([segs], S, bq, text_kv=text_kv)
    assert (layout.kv_count == 0).any()
    q, k, v = make_qkv(gen, B, S, H, D, torch.float32)
    out = check(q, k, v, layout)
    # block 0 attends text keys only
    t = lambda x: x[:, :, 0].float()  # noqa: E731
    s = (t(q)[:, :bq] @ t(k)[:, 80:96].transpose(1, 2)) / D**0.5
    expect = torch.softmax(s, -1) @ t(v)[:, 80:96]
    assert rel_err(out[:, :bq, 0], expect) < 1e-5


def test_mixed_head_patterns_one_call(gen):
    """Heads with different patterns (dense, block mask, permuted segments) stacked into one layout."""
    B, S, H1, D, bq = 2, 96, 1, 32, 16
    dense = Layout.dense(S, H1, block_q=bq)
    blocky = Layout.from_block_mask(random_block_mask(gen, 1, 2, S, bq, 0.3), bq, S)
    permuted = random_layout(gen, S, 1, 1, bq, q_perm=True, kv_perm=True)
    layout = Layout.stack_heads([dense, blocky, permuted])
    assert layout.heads == 4 and layout.q_perm is not None
    q, k, v = make_qkv(gen, B, S, 4, D, torch.float16)
    for permute in ("fused", "separate", "kv_copy"):
        out = check(q, k, v, layout, permute=permute)
    full = F.scaled_dot_product_attention(*(x[:, :, :1].float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert rel_err(out[:, :, :1], full) < 2e-3  # the dense head is plain attention


def test_tile_layouts_plain_and_packed(gen):
    """The tile pattern's layouts at a grid that cuts tiles at every border: padded query slots (plain) and a
    partial last query block with whole-block key segments (packed), with text keys and rows."""
    from sparse_dit.geometry import Geometry
    from sparse_dit.patterns import tile

    g = Geometry(2, 2, 32, 3, 5, 7, text_len=5, text_position="first")
    q, k, v = make_qkv(gen, 2, g.seq_len, 2, 32, torch.float16)
    for packed in (False, True):
        check(q, k, v, tile.build(g, 2, 16, "cpu", window=(2, 1, 2), packed=packed))


@pytest.mark.parametrize("kind", ["transposed", "fused", "padded"])
def test_strided_views(gen, kind):
    B, S, H, D, bq = 2, 70, 2, 32, 16
    layout = random_layout(gen, S, H, 1, bq, q_perm=kind == "fused", kv_perm=kind == "fused")
    q, k, v = make_qkv(gen, B, S, H, D, torch.float16, kind)
    assert not q.is_contiguous()
    out = check(q, k, v, layout)
    assert out.is_contiguous() and out.shape == (B, S, H, D)
    same = check(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    assert torch.equal(out, same)


@pytest.mark.parametrize("block_q,block_n", [(32, 16), (16, 32), (24, 16), (32, 64)])
def test_block_sizes(gen, block_q, block_n):
    """Query blocks that are not a power of two and key chunks larger or smaller than the query block."""
    B, S, H, D = 1, 100, 2, 16
    layout = random_layout(gen, S, H, 1, block_q, text="last", dense=True, max_segments=3)
    q, k, v = make_qkv(gen, B, S, H, D, torch.float32)
    check(q, k, v, layout, config={"BLOCK_N": block_n})


def test_no_lse_and_poisoned_output(gen):
    B, S, H, D, bq = 1, 75, 3, 64, 16
    layout = random_layout(gen, S, H, 1, bq, kv_perm=True)
    q, k, v = make_qkv(gen, B, S, H, D, torch.float16)
    poison = torch.full((B, S, H, D), float("nan"), dtype=q.dtype)
    out = triton_block_sparse_attention(q, k, v, layout, out=poison)
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    assert rel_err(out, reference_attention(q, k, v, layout)) < TOL[q.dtype]


def test_rows_without_keys_are_zero(gen):
    """A query block whose only segment holds padding slots of kv_perm has no keys: zeros and LSE -inf, no NaN."""
    S, H, D, bq = 48, 1, 16, 16
    kv_perm = torch.cat([torch.arange(S, dtype=torch.int32), torch.full((16,), -1, dtype=torch.int32)])[None, None]
    segs = [[[(0, S)], [(S, S + 16)], [(0, 20)]]]
    with pytest.raises(ValueError, match="attends no keys"):  # validation refuses it ...
        Layout.from_segments([segs], S, bq, kv_perm=kv_perm)
    # ... but the kernel must still be safe on an unvalidated layout
    starts = torch.tensor([[[[0], [S], [0]]]], dtype=torch.int32)
    ends = torch.tensor([[[[S], [S + 16], [20]]]], dtype=torch.int32)
    layout = Layout(S, bq, torch.ones(1, 1, 3, dtype=torch.int32), starts, ends, kv_perm=kv_perm)
    q, k, v = make_qkv(gen, 1, S, H, D, torch.float32)
    for permute in ("fused", "separate", "kv_copy"):
        out = torch.full((1, S, H, D), float("nan"))
        out, lse = triton_block_sparse_attention(q, k, v, layout, return_lse=True, out=out, permute=permute)
        assert torch.equal(out[:, 16:32], torch.zeros(1, 16, H, D))
        assert torch.isneginf(lse[:, :, 16:32]).all() and torch.isfinite(lse[:, :, :16]).all()
        ref = reference_attention(q, k, v, layout)
        assert rel_err(out[:, :16], ref[:, :16]) < 1e-5 and rel_err(out[:, 32:], ref[:, 32:]) < 1e-5


def test_chunk_tables_cover_segments_exactly(gen):
    """The flattened chunk tables visit every key of every segment exactly once (pure torch, no kernel)."""
    S, H, bq = 300, 3, 32
    layout = random_layout(gen, S, H, 2, bq, kv_perm=True, max_segments=6)
    for bn in (16, 64):
        n_full, n_clean, fs, n_part, ps, pe = _build_chunk_tables(layout, bn, torch.device("cpu"))
        assert (n_clean <= n_full).all()
        K = layout.kv_order_len
        for l in range(2):
            for h in range(H):
                for qb in range(layout.num_q_blocks):
                    hits = torch.zeros(K + bn, dtype=torch.int64)
                    for t in range(int(n_full[l, h, qb])):
                        a = int(fs[l, h, qb, t])
                        hits[a : a + bn] += 1
                        has_pad = bool((layout.kv_perm[l, h, a : a + bn] < 0).any())
                        assert has_pad == (t >= int(n_clean[l, h, qb])), "clean chunks first, then padded ones"
                    for t in range(int(n_part[l, h, qb])):
                        a, e = int(ps[l, h, qb, t]), int(pe[l, h, qb, t])
                        assert 0 < e - a < bn
                        hits[a:e] += 1
                    want = torch.zeros(K + bn, dtype=torch.int64)
                    for g in range(int(layout.kv_count[l, h, qb])):
                        want[int(layout.kv_start[l, h, qb, g]) : int(layout.kv_end[l, h, qb, g])] += 1
                    assert torch.equal(hits, want)


def test_clear_errors(gen):
    S, H, D = 40, 2, 32
    layout = Layout.dense(S, H, block_q=16)
    q, k, v = make_qkv(gen, 1, S, H, D, torch.float16)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        triton_block_sparse_attention(q.double(), k.double(), v.double(), layout)
    q48 = torch.randn(1, S, H, 48).half()
    with pytest.raises(ValueError, match=r"head dims .*64.*128"):
        triton_block_sparse_attention(q48, q48, q48, layout)
    assert 64 in SUPPORTED_HEAD_DIMS and 128 in SUPPORTED_HEAD_DIMS
    with pytest.raises(ValueError, match="seq_len"):
        triton_block_sparse_attention(q[:, :30], k[:, :30], v[:, :30], layout)
    with pytest.raises(ValueError, match="heads"):
        triton_block_sparse_attention(q, k, v, Layout.dense(S, 3, block_q=16))
    with pytest.raises(ValueError, match=r"\(batch, seq, heads, head_dim\)"):
        triton_block_sparse_attention(q[0], k[0], v[0], layout)
    with pytest.raises(ValueError, match="permute"):
        triton_block_sparse_attention(q, k, v, layout, permute="bogus")
    with pytest.raises(ValueError, match="block_q up to 128"):
        triton_block_sparse_attention(q, k, v, Layout.dense(S, H, block_q=256))


@pytest.mark.skipif(not hasattr(Layout, "with_text_valid"), reason="Layout has no padded-prompt support")
@pytest.mark.parametrize("case", ["text_kv", "in_segments", "perms"])
def test_padded_prompt_keys(gen, case):
    """``text_valid``: only the first text_valid[b] keys of text_range are real for batch element b."""
    B, S, H, D, bq = 2, 100, 2, 16, 16
    T = 20
    for _ in range(50):  # redraw until no row is left with only padded prompt keys
        if case == "text_kv":  # text keys through text_kv, text rows dense
            layout = random_layout(gen, S, H, 1, bq, text="last", dense=True, max_segments=3)
            text_range = layout.text_kv
        elif case == "in_segments":  # no text_kv: the prompt sits inside ordinary segments
            layout = random_layout(gen, S, H, 2, bq, max_segments=3)
            text_range = (S - T, S)
            text_valid = torch.tensor([T - 3, T])
        else:
            layout = random_layout(gen, S, H, 1, bq, q_perm=True, kv_perm=True, text="first", dense=True, max_segments=3)
            text_range = layout.text_kv
        n = text_range[1] - text_range[0]
        if case != "in_segments":
            text_valid = torch.tensor([randint(gen, 1, n - 1), n])
        layout = layout.with_text_valid(text_valid, text_range)
        if layout.to_dense_mask().any(-1).all():
            break
    else:
        raise AssertionError("could not draw a layout where every row keeps a real key")
    q, k, v = make_qkv(gen, B, S, H, D, torch.float32)
    for permute in ("fused", "separate", "kv_copy"):
        check(q, k, v, layout, permute=permute)


@pytest.mark.parametrize("ws", [False, True])
def test_tma_code_path(gen, monkeypatch, ws):
    """The TMA-descriptor path of full unpermuted key chunks (used on Hopper GPUs) and its warp-specialised
    loop variant, forced under the interpreter."""
    import sparse_dit.kernels.triton_attention as ta

    monkeypatch.setattr(ta, "_tma_ok", lambda *a: True)
    B, S, H, D, bq = 2, 100, 2, 32, 16
    layout = random_layout(gen, S, H, 1, bq, text="last", dense=True, max_segments=3)
    q, k, v = make_qkv(gen, B, S, H, D, torch.float16, "fused")
    check(q, k, v, layout, config={"TMA": True, "WS": ws})


# ------------------------------------------------------------- experimental loop (config PREFETCH_IDX)
CHUNK_CYCLE = (0, 1, 2, 5)  # clean full chunks per query block: none, one, two, several


def chunk_count_layout(gen, S, H, L, bq, bn, *, perms=False, text=None, dense=False):
    """Segments built so that the query blocks' clean full-chunk counts (chunks of ``bn`` keys) cycle through
    CHUNK_CYCLE, each with a random partial tail (a tail-only segment where the count is 0), at a random
    unaligned start. With ``perms``: random q_perm with -1 slots; kv_perm puts a random 6 * bn video tokens
    first (the clean region) and the rest, mixed with -1 slots, after it, where every block also gets a short
    segment (a partial chunk that may hold padding slots); text keys, if any, sit after both."""
    text_kv = None
    if text is not None:
        T = randint(gen, 3, 12)
        text_kv = (0, T) if text == "first" else (S - T, S)
    video = torch.ones(S, dtype=torch.bool)
    if text_kv is not None:
        video[text_kv[0] : text_kv[1]] = False
    video_tokens = video.nonzero()[:, 0].to(torch.int32)
    clean = 6 * bn
    assert video_tokens.numel() > clean + 4
    q_perms = kv_perms = None
    if perms:
        nq_len = (-(-S // bq) + 1) * bq
        q_perms = torch.stack([
            torch.stack([random_perm_with_padding(gen, torch.arange(S, dtype=torch.int32), nq_len) for _ in range(H)])
            for _ in range(L)
        ])
        per = []
        n_pad = randint(gen, 1, 8)
        for _ in range(L * H):
            toks = video_tokens[torch.randperm(video_tokens.numel(), generator=gen)]
            rest = random_perm_with_padding(gen, toks[clean:], toks.numel() - clean + n_pad)
            p = torch.cat([toks[:clean], rest])
            if text_kv is not None:
                p = torch.cat([p, torch.arange(*text_kv, dtype=torch.int32)])
            per.append(p)
        kv_perms = torch.stack(per).view(L, H, -1)
        lo, dirty_hi = 0, kv_perms.shape[-1] - (0 if text_kv is None else text_kv[1] - text_kv[0])
    else:
        lo = 0 if text != "first" else text_kv[1]
        dirty_hi = lo + video_tokens.numel()
    NQ = -(-(q_perms.shape[-1] if perms else S) // bq)
    segments = []
    for l in range(L):
        per_h = []
        for h in range(H):
            per_q = []
            for qb in range(NQ):
                c = CHUNK_CYCLE[(qb + h + l) % len(CHUNK_CYCLE)]
                length = c * bn + randint(gen, 1 if c == 0 else 0, bn - 1)
                a = lo + randint(gen, 0, clean - length)
                segs = [(a, a + length)]
                if perms or randint(gen, 0, 1):  # a short segment after the clean region
                    b0 = randint(gen, lo + clean, dirty_hi - 1)
                    segs.append((b0, min(dirty_hi, b0 + randint(gen, 1, bn - 1))))
                per_q.append(segs)
            per_h.append(per_q)
        segments.append(per_h)
    layout = Layout.from_segments(
        segments, S, bq, q_perm=q_perms, kv_perm=kv_perms, text_kv=text_kv, dense_q=text_kv if dense else None
    )
    n_clean = _build_chunk_tables(layout, bn, torch.device("cpu"))[1]
    for c in CHUNK_CYCLE:  # the layout holds every count: none, the loop's first chunk only, two, several
        assert (n_clean == c).any(), (c, n_clean)
    return layout


@pytest.mark.parametrize(
    "B,H,L,dtype,text,dense,tma",
    [
        (2, 3, 1, torch.float16, "last", False, False),
        (2, 2, 2, torch.float32, "last", True, False),  # per-layer layouts, dense text rows
        (1, 3, 1, torch.float32, "first", False, True),  # TMA requested (unused by the gather path)
    ],
)
def test_prefetch_idx_loop(gen, monkeypatch, B, H, L, dtype, text, dense, tma):
    """The opt-in index-prefetching ("PREFETCH_IDX") clean-chunk loop of the fused gather path vs the reference
    and the default loop, on permuted layouts whose query blocks hold 0, 1, 2 and several clean chunks, S not
    a multiple of the block, poisoned outputs."""
    import sparse_dit.kernels.triton_attention as ta

    if tma:
        monkeypatch.setattr(ta, "_tma_ok", lambda *a: True)
    S, D, bq, bn = 150, 32, 16, 16
    layout = chunk_count_layout(gen, S, H, L, bq, bn, perms=True, text=text, dense=dense)
    q, k, v = make_qkv(gen, B, S, H, D, dtype)
    cfg = {"PREFETCH_IDX": True, "BLOCK_N": bn, "TMA": tma}
    got = check(q, k, v, layout, permute="fused", config=cfg)
    base = triton_block_sparse_attention(q, k, v, layout, permute="fused", config={"BLOCK_N": bn, "TMA": tma})
    assert rel_err(got, base) < TOL[dtype], "PREFETCH_IDX loop disagrees with the default loop"


def test_prefetch_idx_padded_prompt(gen):
    """PREFETCH_IDX with padded prompt keys among the permuted keys: the clean chunks are masked then."""
    B, S, H, D, bq, bn = 2, 150, 2, 16, 16, 16
    for _ in range(20):  # redraw until no row is left with padded keys only
        layout = chunk_count_layout(gen, S, H, 1, bq, bn, perms=True)
        layout = layout.with_text_valid(torch.tensor([randint(gen, 5, 30), 40]), (0, 40))
        if layout.to_dense_mask().any(-1).all():
            break
    else:
        raise AssertionError("could not draw a layout where every row keeps a real key")
    q, k, v = make_qkv(gen, B, S, H, D, torch.float32)
    check(q, k, v, layout, permute="fused", config={"BLOCK_N": bn, "PREFETCH_IDX": True})


def test_unknown_config_key(gen):
    S, H, D = 40, 2, 16
    q, k, v = make_qkv(gen, 1, S, H, D, torch.float16)
    with pytest.raises(ValueError, match="unknown kernel config"):
        triton_block_sparse_attention(q, k, v, Layout.dense(S, H, block_q=16), config={"PREFETCH": True})


def test_permute_auto_resolution_and_default(gen):
    """"auto" (the default) copies permuted keys only where TMA reads the copies; it computes what "fused" does."""
    from sparse_dit.kernels.triton_attention import DEFAULT_PERMUTE, resolve_permute

    assert DEFAULT_PERMUTE == "auto"
    assert resolve_permute("auto", True, True) == "kv_copy"
    assert resolve_permute("auto", True, False) == "fused"  # no TMA (interpreter, pre-Hopper): copies buy nothing
    assert resolve_permute("auto", False, True) == "fused"  # nothing to copy
    assert resolve_permute("separate", True, True) == "separate"  # an explicit mode is kept
    layout = random_layout(gen, 80, 2, 1, 16, q_perm=True, kv_perm=True)
    q, k, v = make_qkv(gen, 1, 80, 2, 16, torch.float16)
    a = check(q, k, v, layout)  # default
    b = check(q, k, v, layout, permute="kv_copy")
    assert rel_err(a, b) < 2e-3
    with pytest.raises(ValueError, match="permute must be one of"):
        triton_block_sparse_attention(q, k, v, layout, permute="gather")
