"""Layouts are checked before any backend reads through them, keys a row does not attend never reach it (not even a
NaN), and rows left without keys by prompt padding give 0 (issue 13, items 8 and 9). The Triton kernel runs on the
CPU under the Triton interpreter, as in test_kernel_triton.py."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from sparse_dit.kernels import block_sparse_attention, reference_attention  # noqa: E402
from sparse_dit.layout import Layout  # noqa: E402

pytest.importorskip("triton")

from sparse_dit.kernels.triton_attention import triton_block_sparse_attention  # noqa: E402

S, BQ = 48, 16


def i32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int32)


def one_segment_per_block(segments: list[tuple[int, int]], **kw) -> Layout:
    """A (1, 1, NQ) layout whose query block i attends the one segment ``segments[i]``."""
    n = len(segments)
    return Layout(S, BQ, torch.ones(1, 1, n, dtype=torch.int32), i32([[[[s] for s, _ in segments]]]), i32([[[[e] for _, e in segments]]]), **kw)


def qkv(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, S, 1, 16, generator=g).to(dtype) for _ in range(3)]


# ------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: one_segment_per_block([(0, 48), (0, 60), (0, 48)]), r"\[0, 60\).* inside \[0, 48\)"),
        (lambda: one_segment_per_block([(0, 48), (30, 20), (0, 48)]), "start <= end"),
        (lambda: one_segment_per_block([(-5, 8), (0, 48), (0, 48)]), r"inside \[0, 48\)"),
        (lambda: Layout(S, BQ, i32([[[2, 1, 1]]]), i32([[[[0], [0], [0]]]]), i32([[[[48], [48], [48]]]])), r"kv_count must lie in \[0, 1\]"),
        (lambda: one_segment_per_block([(0, 48)] * 3, q_perm=torch.cat([torch.arange(47), i32([0])]).view(1, 1, 48)), "lists a token twice"),
        (lambda: one_segment_per_block([(0, 48)] * 3, q_perm=torch.cat([torch.arange(47), i32([-1])]).view(1, 1, 48)), "misses query token 47"),
        (lambda: one_segment_per_block([(0, 48)] * 3, kv_perm=torch.arange(1, 49).view(1, 1, 48)), r"kv_perm entries must be -1 \(padding\) or token indices in \[0, 48\)"),
        (lambda: one_segment_per_block([(0, 48)] * 3, kv_perm=torch.zeros(1, 1, 48, dtype=torch.int32)), "kv_perm lists a token twice"),
    ],
)
def test_layouts_with_out_of_range_indices_are_refused_on_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("entry", [block_sparse_attention, triton_block_sparse_attention])
def test_every_kernel_entry_checks_bounds_first(entry, monkeypatch):
    layout = one_segment_per_block([(0, 48)] * 3)
    q, k, v = qkv()
    checked = []

    def check(self):
        checked.append(self)
        raise ValueError("checked")

    monkeypatch.setattr(Layout, "check_bounds", check)
    with pytest.raises(ValueError, match="checked"):
        entry(q, k, v, layout)
    assert checked == [layout]


# ----------------------------------------------------------------------------------------- validate
def test_validate_accepts_keys_lost_to_prompt_padding_per_batch_element():
    """Per-batch layout with text keys: element 0's prompt is empty (its text-only block has no key left), element 1's
    is not. Valid: rows without keys output 0. A block without any key by structure is still refused."""
    count = i32([[[1, 1, 0]], [[1, 0, 1]]])  # (L=2, H=1, NQ=3); the empty blocks attend text_kv only
    start = i32([[[[0], [0], [0]]], [[[0], [0], [16]]]])
    end = i32([[[[40], [40], [0]]], [[[40], [0], [40]]]])
    layout = Layout(S, BQ, count, start, end, text_kv=(40, 48)).with_text_valid(i32([0, 5]))
    assert layout.validate() is layout
    with pytest.raises(ValueError, match="attends no keys"):
        Layout(S, BQ, count, start, end).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_whose_only_keys_are_padded_prompt_keys_give_zero(dtype):
    """Block 0 attends only the prompt (40..48) and the prompt is all padding: its rows have no key. The layout is
    valid and the kernel gives 0 there (SDPA would give NaN); the other rows are exact."""
    layout = one_segment_per_block([(40, 48), (0, 48), (0, 48)]).with_text_valid(i32([0]), (40, 48))
    layout.validate()
    q, k, v = qkv(1, dtype)
    out = triton_block_sparse_attention(q, k, v, layout)
    assert torch.equal(out[:, :BQ], torch.zeros_like(out[:, :BQ]))
    keys = torch.arange(S) < 40
    expected = torch.softmax((q[0, BQ:, 0].float() @ k[0, :, 0].float().T / 4).masked_fill(~keys, float("-inf")), -1) @ v[0, :, 0].float()
    torch.testing.assert_close(out[0, BQ:, 0].float(), expected, atol=2e-3, rtol=2e-3)


# -------------------------------------------------------------------------------------- NaN hygiene
def nan_cases():
    # (a) kv_perm padding slots: block 0's segment [0, 48) of the key order holds 43 keys (5..47) and 5 padding
    # slots, which masked lanes used to load as token 0
    kv_perm = torch.cat([torch.arange(5, 48), i32([-1] * 5), torch.arange(0, 5), i32([-1] * 11)]).view(1, 1, 64)
    perm_layout = Layout(S, BQ, i32([[[1, 1, 1]]]), i32([[[[0], [0], [0]]]]), i32([[[[48], [64], [64]]]]), kv_perm=kv_perm)
    # (b) padded prompt keys inside segments (no text_kv): keys 42..47 are padding, read unmasked in full chunks
    padded_layout = one_segment_per_block([(0, 48)] * 3).with_text_valid(i32([2]), (40, 48))
    return [("kv_perm padding", perm_layout, [0, 1, 2]), ("padded prompt", padded_layout, [45])]


@pytest.mark.parametrize("permute", ["fused", "separate", "kv_copy"])
@pytest.mark.parametrize("case", range(2))
def test_nan_values_of_keys_a_row_does_not_attend_never_reach_it(case, permute):
    name, layout, poisoned = nan_cases()[case]
    q, k, v = qkv(2)
    clean_v = v.clone()
    v[:, poisoned] = float("nan")
    k[:, poisoned[-1]] = float("inf")
    out = triton_block_sparse_attention(q, k, v, layout, permute=permute)
    mask = layout.to_dense_mask()[0, 0]  # (S, S) keys each row attends
    rows = ~mask[:, poisoned].any(1)  # rows that attend none of the poisoned keys
    assert rows.sum() >= BQ, name
    assert torch.isfinite(out[0, rows]).all(), name
    clean_k = k.clone()
    clean_k[:, poisoned[-1]] = 0
    expected = reference_attention(q, clean_k, clean_v, layout)
    torch.testing.assert_close(out[0, rows], expected[0, rows], atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------ gradients
def test_gradients_are_never_silently_missing(monkeypatch):
    """The Triton kernel has no backward: block_sparse_attention on a supported GPU (simulated) runs the differentiable
    reference when gradients are needed (one warning), and the kernel itself refuses grad-requiring inputs."""
    from sparse_dit import kernels

    layout = one_segment_per_block([(0, 32), (0, 48), (16, 48)])
    q, k, v = (t.requires_grad_() for t in qkv(3))
    monkeypatch.setattr(kernels, "triton_supported", lambda q: True)
    monkeypatch.setattr(kernels, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="forward-only"):
        out = block_sparse_attention(q, k, v, layout)
    assert out.grad_fn is not None
    out.sum().backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_attention(q, k, v, layout).sum().backward()
    for got, t in zip(expected, (q, k, v)):
        torch.testing.assert_close(got, t.grad)
    with torch.no_grad():  # no gradients needed: the kernel runs (here under the interpreter)
        torch.testing.assert_close(block_sparse_attention(q, k, v, layout), out.detach(), atol=2e-5, rtol=2e-5)
    with pytest.raises(RuntimeError, match="forward-only"):
        triton_block_sparse_attention(q, k, v, layout)
