"""PyTorch reference of block-sparse attention over a `Layout`: the CPU backend and the test oracle.

Memory stays bounded at long sequences: one (batch, head) at a time and at most ``rows_per_chunk``
query rows against the whole key set, never an S x S matrix for all heads at once.
"""

from __future__ import annotations

import math

import torch

from sparse_dit.layout import Layout

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> None:
    """Shape/dtype checks shared by every backend, with messages that say what to pass."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, seq, heads, head_dim) like diffusers' attention inputs; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"self-attention needs q and k of one shape and v with the same (batch, seq, heads); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED:
        raise TypeError(f"q, k, v must share one floating dtype out of {_SUPPORTED}; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, S, H, _ = q.shape
    if layout.seq_len != S:
        raise ValueError(f"layout was built for seq_len={layout.seq_len} but q has {S} tokens; rebuild the layout")
    if layout.heads != H:
        raise ValueError(f"layout has {layout.heads} heads but q has {H}; build one layout per head of the layer")
    if layout.batch not in (1, B):
        raise ValueError(f"layout leading dimension must be 1 or the batch size {B}; got {layout.batch}")
    if layout.text_valid is not None and layout.text_valid.numel() not in (1, B):
        raise ValueError(f"layout.text_valid must have 1 or {B} entries; got {layout.text_valid.numel()}")


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
    rows_per_chunk: int = 2048,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to ``layout``, computed in float32 (float64 stays float64).

    q, k: (B, S, H, D); v: (B, S, H, Dv). Returns out (B, S, H, Dv) in q's dtype and, with
    ``return_lse``, lse (B, H, S) float32: natural-log log-sum-exp of the scaled scores of each row.
    """
    check_qkv(q, k, v, layout)
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = layout.to(q.device)
    out = torch.empty(B, S, H, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    blocks_per_chunk = max(1, rows_per_chunk // layout.block_q)

    def attend(rows: torch.Tensor, keys: torch.Tensor, b: int, h: int) -> None:
        """rows: (n,) query indices; keys: (n, S) bool."""
        qs = q[b, rows, h].to(work)
        scores = (qs @ k[b, :, h].to(work).T) * scale
        scores = scores.masked_fill(~keys, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse[:, None])
        out[b, rows, h] = (probs @ v[b, :, h].to(work)).to(q.dtype)
        lse[b, h, rows] = row_lse.float()

    for b in range(B):
        l = b if layout.batch > 1 else 0
        pad = layout.padded_text(b)
        for h in range(H):
            for first in range(0, layout.num_q_blocks, blocks_per_chunk):
                blocks = torch.arange(first, min(first + blocks_per_chunk, layout.num_q_blocks), device=q.device)
                rows = layout.query_rows(l, h, blocks)  # (nb, block_q)
                keys = layout.key_mask(l, h, blocks)  # (nb, S)
                if pad is not None:
                    keys[:, pad[0] : pad[1]] = False
                valid = rows >= 0
                if valid.any():
                    attend(rows[valid], keys[:, None, :].expand(-1, layout.block_q, -1)[valid], b, h)
            if layout.dense_q is not None:
                a, e = layout.dense_q
                all_keys = torch.ones(S, dtype=torch.bool, device=q.device)
                if pad is not None:
                    all_keys[pad[0] : pad[1]] = False
                for s in range(a, e, rows_per_chunk):
                    rows = torch.arange(s, min(s + rows_per_chunk, e), device=q.device)
                    attend(rows, all_keys.expand(rows.numel(), S), b, h)
    return (out, lse) if return_lse else out
