"""Layout construction/validation and the PyTorch reference attention against explicit masked SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_dit import Layout
from sparse_dit.kernels import block_sparse_attention, reference_attention


def masked_sdpa(q, k, v, token_mask, scale=None):
    """Oracle: SDPA over (B, H, S, D) with a boolean (L, H, S, S) mask, back to (B, S, H, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(), attn_mask=token_mask, scale=scale
    )
    return out.transpose(1, 2)


def rand_qkv(B, S, H, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g, dtype=dtype) for _ in range(3)]


def random_segment_layout(S, H, L, block_q, seed, perm=False, text=None, dense_q=None):
    """Random disjoint segments of arbitrary lengths, optional random permutations with -1 padding."""
    g = torch.Generator().manual_seed(seed)
    pad_q = 5 if perm else 0
    q_len = -(-(S + pad_q) // block_q) * block_q
    nq = q_len // block_q
    kv_len = S + (3 if perm else 0)
    segments = []
    for _ in range(L):
        per_l = []
        for _ in range(H):
            per_h = []
            for _ in range(nq):
                cuts = sorted(set(torch.randint(0, kv_len + 1, (6,), generator=g).tolist()))
                segs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
                per_h.append(segs or [(0, kv_len)])
            per_l.append(per_h)
        segments.append(per_l)
    kwargs = {"text_kv": text, "dense_q": dense_q}
    if perm:
        qp = torch.full((L, H, q_len), -1, dtype=torch.int32)
        kp = torch.full((L, H, kv_len), -1, dtype=torch.int32)
        for l in range(L):
            for h in range(H):
                slots = torch.randperm(q_len, generator=g)[:S]
                qp[l, h, slots] = torch.arange(S, dtype=torch.int32)
                kslots = torch.randperm(kv_len, generator=g)[:S]
                kp[l, h, kslots] = torch.arange(S, dtype=torch.int32)
        if text is not None:  # text keys are reached through text_kv only: hide them from the key order
            kp = torch.where((kp >= text[0]) & (kp < text[1]), -1, kp)
        kwargs.update(q_perm=qp, kv_perm=kp)
    elif text is not None:
        raise ValueError("test helper: text needs perm=True so segments can avoid text keys")
    return Layout.from_segments(segments, S, block_q, **kwargs)


def test_from_block_mask_matches_token_mask_and_density():
    S, block = 75, 16
    nb = 5
    mask = torch.rand(2, 3, nb, nb) < 0.5
    mask[..., 0] = True
    lay = Layout.from_block_mask(mask, block, seq_len=S)
    idx = torch.arange(S) // block
    expected = mask[:, :, idx][:, :, :, idx]
    assert torch.equal(lay.to_dense_mask(), expected)
    assert math.isclose(lay.density, expected.double().mean().item(), rel_tol=1e-9)
    assert torch.allclose(lay.density_per_head(), expected.double().mean((-1, -2)))
    # consecutive kept blocks coalesce into one segment
    full = Layout.from_block_mask(torch.ones(1, 1, nb, nb, dtype=torch.bool), block, seq_len=S)
    assert full.kv_count.max() == 1 and full.kv_end.max() == S and full.density == 1.0


@pytest.mark.parametrize("B,H,L", [(1, 1, 1), (2, 3, 1), (2, 2, 2), (3, 2, 3)])
@pytest.mark.parametrize("perm", [False, True])
def test_reference_matches_masked_sdpa(B, H, L, perm):
    S, D, block = 53, 16, 16
    seed = int(torch.randint(0, 2**31, ()).item())
    lay = random_segment_layout(S, H, L, block, seed, perm=perm)
    q, k, v = rand_qkv(B, S, H, D, seed)
    mask = lay.to_dense_mask().expand(B, H, S, S)
    out, lse = reference_attention(q, k, v, lay, return_lse=True, rows_per_chunk=32)
    exp = masked_sdpa(q, k, v, mask)
    torch.testing.assert_close(out.double(), exp, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) / math.sqrt(D)
    exp_lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), exp_lse, atol=1e-4, rtol=1e-5)


def test_reference_text_range_and_dense_rows_and_strided_views():
    B, S, H, D = 2, 61, 2, 8
    text = (48, 61)
    lay = random_segment_layout(S, H, 1, 16, seed=7, perm=True, text=text, dense_q=text)
    base = torch.randn(B, H, S, 3 * D)  # strided (B, S, H, D) views, like a fused projection transposed
    q, k, v = (base[..., i * D : (i + 1) * D].transpose(1, 2) for i in range(3))
    mask = lay.to_dense_mask()
    assert mask[:, :, :, text[0] :].all() and mask[:, :, text[0] :, :].all()
    out = block_sparse_attention(q, k, v, lay, scale=0.3)
    torch.testing.assert_close(out.double(), masked_sdpa(q, k, v, mask.expand(B, H, S, S), scale=0.3), atol=1e-5, rtol=1e-5)


def test_stack_and_take_heads_preserve_per_head_masks():
    S = 40
    a = Layout.dense(S, 1, block_q=16)
    b = Layout.from_block_mask((torch.rand(1, 2, 3, 3) < 0.5) | torch.eye(3, dtype=torch.bool), 16, seq_len=S)
    c = random_segment_layout(S, 1, 1, 16, seed=3, perm=True)
    stacked = Layout.stack_heads([a, b, c]).validate()
    expected = torch.cat([a.to_dense_mask(), b.to_dense_mask(), c.to_dense_mask()], 1)
    assert torch.equal(stacked.to_dense_mask(), expected)
    order = torch.tensor([3, 0, 2, 1])
    assert torch.equal(stacked.take_heads(order).to_dense_mask(), expected[:, order])


@pytest.mark.parametrize("perm,text,dense", [(False, None, False), (True, None, False), (True, (48, 61), False), (True, (0, 9), True)])
@pytest.mark.parametrize("work", [None, 1])
def test_row_key_mask_matches_token_mask(perm, text, dense, work, monkeypatch):
    """The profiler's row mask equals the rows of the dense token mask, for sampled, unsorted, repeated rows; also
    with the work space so small that every head is a chunk of its own."""
    if work is not None:
        import sparse_dit.layout as layout_module

        monkeypatch.setattr(layout_module, "ROWS_MASK_WORK_ENTRIES", work)
    S, H, L = 61, 3, 2
    lay = random_segment_layout(S, H, L, 16, seed=11, perm=perm, text=text, dense_q=text if dense else None)
    full = lay.to_dense_mask()
    g = torch.Generator().manual_seed(5)
    for rows in (torch.arange(S), torch.randint(0, S, (23,), generator=g), torch.tensor([S - 1, 0, S - 1])):
        for l in range(L):
            got = lay.rows_key_mask(l, rows)
            assert got.shape == (H, rows.numel(), S) and got.dtype == torch.bool
            assert torch.equal(got, full[l][:, rows])


def test_validation_errors_are_clear():
    count = torch.ones(1, 1, 2, dtype=torch.int32)
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.int32)  # noqa: E731
    with pytest.raises(ValueError, match="has 5 query blocks .* expected 3"):
        Layout(40, 16, torch.ones(1, 1, 5, dtype=torch.int32), zeros(1, 1, 5, 1), zeros(1, 1, 5, 1) + 1)
    with pytest.raises(ValueError, match=r"inside \[0, 20\)"):
        Layout(20, 16, count, zeros(1, 1, 2, 1), zeros(1, 1, 2, 1) + 25).validate()
    with pytest.raises(ValueError, match="overlap"):
        Layout(20, 16, count * 2, torch.tensor([[[[0, 5], [0, 5]]]]), torch.tensor([[[[10, 12], [10, 12]]]])).validate()
    with pytest.raises(ValueError, match="attends no keys"):
        Layout(20, 16, count * 0, zeros(1, 1, 2, 1), zeros(1, 1, 2, 1)).validate()
    with pytest.raises(ValueError, match="misses query token"):
        Layout(20, 16, count, zeros(1, 1, 2, 1), zeros(1, 1, 2, 1) + 20, q_perm=zeros(1, 1, 32) - 1).validate()
    with pytest.raises(ValueError, match="text keys"):
        Layout(20, 16, count, zeros(1, 1, 2, 1), zeros(1, 1, 2, 1) + 20, text_kv=(15, 20)).validate()
    with pytest.raises(ValueError, match="block mask .* must have shape"):
        Layout.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, seq_len=60)
    with pytest.raises(TypeError, match="integer tensor"):
        Layout(20, 16, count.float(), zeros(1, 1, 2, 1), zeros(1, 1, 2, 1) + 1)


def test_reference_input_errors():
    lay = Layout.dense(10, 2, block_q=16)
    q = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="built for seq_len=10 but q has 12"):
        reference_attention(torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8), lay)
    with pytest.raises(ValueError, match="layout has 2 heads but q has 3"):
        x = torch.randn(1, 10, 3, 8)
        reference_attention(x, x, x, lay)
    with pytest.raises(ValueError, match=r"\(batch, seq, heads, head_dim\)"):
        reference_attention(q[0], q[0], q[0], lay)
    with pytest.raises(TypeError, match="floating dtype"):
        reference_attention(q.long(), q.long(), q.long(), lay)


def test_reference_is_memory_bounded_at_long_sequences():
    """32k tokens, one head: the reference must work chunk-wise (an S x S fp32 matrix alone would be 4 GiB)."""
    S, D, block = 32768, 16, 128
    nb = S // block
    mask = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
    idx = torch.arange(nb)
    mask[0, 0, idx, idx] = True
    mask[0, 0, idx, (idx + 1) % nb] = True
    lay = Layout.from_block_mask(mask, block)
    q, k, v = rand_qkv(1, S, 1, D, seed=0)
    out = reference_attention(q, k, v, lay, rows_per_chunk=1024)
    rows = torch.arange(5 * block, 6 * block)
    keys = torch.arange(5 * block, 7 * block)
    exp = torch.softmax(q[0, rows, 0] @ k[0, keys, 0].T / math.sqrt(D), -1) @ v[0, keys, 0]
    torch.testing.assert_close(out[0, rows, 0], exp, atol=1e-5, rtol=1e-5)
