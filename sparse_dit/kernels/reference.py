"""PyTorch backends of block-sparse attention over a `Layout`: the CPU backend and the test oracle.

Two methods compute the same function:

- ``"gather"`` (the default, the CPU backend): per (batch, head, query block) the kept keys are gathered
  and a small dense attention runs on them, so the work scales with the layout's density and a sparse run
  is faster than dense SDPA on a CPU. Keys are copied in units of the gcd of the segments' starts and
  lengths (whole tiles for the tile pattern); query blocks of one head that share a key list (border
  tiles, dense heads) are one item with a longer query; items with the same number of keys are batched
  (bucketed by key count) so a call is a few large CPU flash-attention calls, not a Python loop per block.
  The index tables behind this are built once per layout and batch size and cached on the layout.
- ``"masked"`` (the oracle, `masked_reference_attention`): every query block against the whole key set
  with the layout's mask, one (batch, head) and ``rows_per_chunk`` query rows at a time. Simple enough
  to trust, and slower than dense attention (see benchmarks/results/cpu_backend.md).

Contract of both (the Triton kernel honours the same): a row with no key at all gives 0 and LSE -inf;
a key a row does not attend never contributes, even where K or V hold NaN/inf; float32 and float64 are
computed in their own precision, float16/bfloat16 in float32 and returned in the input dtype; memory
stays bounded (never an S x S matrix for all heads at once); gradients flow to q, k and v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sparse_dit.layout import Layout

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Method = Literal["gather", "masked"]
METHODS = ("gather", "masked")

# Gathered K and V of one batched attention call stay under this many bytes (per call, not per model).
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Buckets: exact key counts while there are at most this many distinct ones (static patterns such as tile
# have a handful), else counts within _BUCKET_SLACK of each other share a bucket, padded and masked.
_MAX_EXACT_BUCKETS = 32
_BUCKET_SLACK = 1 / 8


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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
    rows_per_chunk: int = 2048,
    method: Method = "gather",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against k, v restricted to ``layout``.

    q, k: (B, S, H, D); v: (B, S, H, Dv), any strides. Returns out (B, S, H, Dv) in q's dtype and, with
    ``return_lse``, lse (B, H, S): the natural-log log-sum-exp of each row's scaled scores over the keys
    it attends (-inf for a row with no key), float64 for float64 inputs and float32 otherwise.

    method: ``"gather"`` computes only the kept keys (the CPU backend); ``"masked"`` is the simple
    masked-dense oracle. rows_per_chunk bounds the query rows per step of the masked path and of dense
    text rows; chunk_bytes bounds the gathered K and V of one step of the gather path.
    """
    check_qkv(q, k, v, layout)
    if method not in METHODS:
        raise ValueError(f"reference_attention: method must be one of {METHODS}, got {method!r}")
    if layout.device != q.device:  # `to` makes a new layout object, which would drop the cached plan
        layout = layout.to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if method == "masked":
        out, lse = _masked_attention(q, k, v, layout, scale, rows_per_chunk)
    else:
        out, lse = _gather_attention(q, k, v, layout, scale, return_lse, rows_per_chunk, chunk_bytes)
    return (out, lse) if return_lse else out


def masked_reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
    rows_per_chunk: int = 2048,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The masked-dense oracle: `reference_attention` with ``method="masked"``."""
    return reference_attention(q, k, v, layout, scale, return_lse, rows_per_chunk, method="masked")


# ------------------------------------------------------------------------------------------ masked oracle
def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float, rows_per_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query block against all S keys with its key mask; one (batch, head) at a time."""
    B, S, H, _ = q.shape
    work = _work_dtype(q.dtype)
    out = torch.zeros(B, S, H, v.shape[-1], dtype=work, device=q.device)
    lse = torch.full((B, H, S), float("-inf"), dtype=work, device=q.device)
    bq = layout.block_q
    blocks_per_chunk = max(1, rows_per_chunk // bq)
    # with NaN/inf somewhere in K or V, a key outside a group's mask is zeroed in that group's copy of K and V,
    # so it reaches neither the output nor the gradients (0 * NaN would); finite inputs need no copies
    sanitize = not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all()))

    def attend(rows: torch.Tensor, keys: torch.Tensor, b: int, h: int) -> None:
        """rows: (n, r) original query indices, -1 for rows to skip; keys: (n, S) bool, one mask per row group."""
        valid = rows >= 0
        qs = q[b, rows.clamp(min=0), h].to(work) * scale  # (n, r, D)
        ks, vs = k[b, :, h].to(work), v[b, :, h].to(work)  # (S, D)
        if sanitize:  # one copy of K and V per row group: (n, S, D)
            ks, vs = torch.where(keys[..., None], ks, 0), torch.where(keys[..., None], vs, 0)
            scores = qs @ ks.transpose(1, 2)
        else:  # one matmul against the shared keys
            scores = (qs.flatten(0, 1) @ ks.T).view(*rows.shape, -1)
        scores = scores.masked_fill(~keys[:, None, :], float("-inf"))  # (n, r, S)
        row_lse = torch.logsumexp(scores, dim=-1)  # (n, r); -inf for a group without keys
        probs = torch.exp(scores - torch.where(torch.isinf(row_lse), 0, row_lse)[..., None])
        values = probs @ vs if sanitize else (probs.flatten(0, 1) @ vs).view(*rows.shape, -1)
        out[b, rows[valid], h] = values[valid]
        lse[b, h, rows[valid]] = row_lse[valid]

    for b in range(B):
        l = b if layout.batch > 1 else 0
        pad = layout.padded_text(b)
        for h in range(H):
            for first in range(0, layout.num_q_blocks, blocks_per_chunk):
                blocks = torch.arange(first, min(first + blocks_per_chunk, layout.num_q_blocks), device=q.device)
                rows = layout.query_rows(l, h, blocks)  # (nb, block_q)
                if (rows >= 0).any():
                    keys = layout.key_mask(l, h, blocks)  # (nb, S)
                    if pad is not None:
                        keys[:, pad[0] : pad[1]] = False
                    attend(rows, keys, b, h)
            if layout.dense_q is not None:
                a, e = layout.dense_q
                all_keys = torch.ones(1, S, dtype=torch.bool, device=q.device)
                if pad is not None:
                    all_keys[:, pad[0] : pad[1]] = False
                for s in range(a, e, rows_per_chunk):
                    attend(torch.arange(s, min(s + rows_per_chunk, e), device=q.device)[None], all_keys, b, h)
    return out.to(q.dtype), lse


# ------------------------------------------------------------------------------------------- gather path
# A bucket's table of unit indices is cached with the plan up to this many entries (else built per step).
_CACHED_INDEX_ENTRIES = 2**23


@dataclass(frozen=True)
class _Bucket:
    """Work items that attend ``width`` keys each (``padded``: at most ``width``, the rest masked out).

    An item is one (batch element, head) and a group of its query blocks that share one key list, with
    ``rows`` query rows (query blocks x block_q, skipped slots included). Its queries sit at
    ``q_start + i * rows`` of `_GatherPlan.q_rows`, in item order. Per item (n items): ``unit_base`` (n,)
    its first unit in the gathered K/V units; ``n_units`` (n,) its key count in units; ``seg_cum`` (n, G)
    the running total of its segment lengths and ``seg_offset`` (n, G) each segment's start minus the
    units before it, both in units, so that unit j of the item is unit ``seg_offset[g] + j`` of its key
    list, g the first segment whose running total exceeds j. ``unit_index`` (n, width / unit): the
    resulting unit indices (base included), when small enough to keep.
    """

    width: int
    padded: bool
    rows: int
    q_start: int
    unit_base: torch.Tensor
    n_units: torch.Tensor
    seg_cum: torch.Tensor
    seg_offset: torch.Tensor
    unit_index: torch.Tensor | None


@dataclass(frozen=True)
class _GatherPlan:
    """What the gather path derives from a layout and a batch size once (cached on the layout).

    ``key_rows`` (B * H * K',): for each (batch, head), the flat K/V row (``(b * H + h) * S + token``) of
    each entry of its compacted key list: the layout's key order without -1 slots and padded prompt
    keys, then the text keys, then filler up to K', a multiple of ``unit``. ``unit`` is the gcd of every
    segment's start and length in those lists: keys are gathered ``unit`` at a time (whole tiles for tile
    layouts), which copies far faster than key by key. ``q_rows`` (T,): the flat query row of every
    item row of every bucket, in bucket and item order. ``out_index`` (B * H * S,): for each flat output
    row, its row in the concatenation of the buckets' outputs, the dense rows' outputs ((b, h, row) order)
    and one zero row (rows without keys); ``out_index_bshd`` the same in (batch, token, head) order.
    """

    unit: int
    key_rows: torch.Tensor
    q_rows: torch.Tensor
    out_index: torch.Tensor
    out_index_bshd: torch.Tensor
    buckets: tuple[_Bucket, ...]


def _width_groups(widths: list[int]) -> list[tuple[int, int]]:
    """(lowest, highest) key counts that share a bucket: exact counts while there are few distinct ones."""
    if len(widths) <= _MAX_EXACT_BUCKETS:
        return [(w, w) for w in widths]
    groups, i = [], 0
    while i < len(widths):  # ascending: a bucket takes every count within the slack of its smallest
        j = i
        while j + 1 < len(widths) and widths[j + 1] <= widths[i] * (1 + _BUCKET_SLACK):
            j += 1
        groups.append((widths[i], widths[j]))
        i = j + 1
    return groups


def _expand_units(n_units: torch.Tensor, seg_cum: torch.Tensor, seg_offset: torch.Tensor, base: torch.Tensor, W: int) -> torch.Tensor:
    """(n, W) unit indices of n items (see `_Bucket`); slots past an item's keys repeat its first unit."""
    pos = torch.arange(W, device=seg_cum.device).repeat(seg_cum.shape[0], 1)
    seg = torch.searchsorted(seg_cum, pos, right=True).clamp(max=seg_cum.shape[-1] - 1)
    rel = seg_offset.gather(1, seg) + pos
    rel = torch.where(pos < n_units[:, None], rel, rel[:, :1])
    return base[:, None] + rel


def _build_gather_plan(layout: Layout, B: int, max_blocks_per_item: int) -> _GatherPlan:
    """The gather path's index tables for ``layout`` at batch size B (items of at most max_blocks_per_item
    query blocks). Pure index work on the layout's device; no q, k, v needed."""
    L, H, NQ, G = layout.kv_start.shape
    S, bq, device = layout.seq_len, layout.block_q, layout.device
    # plan rows: the layout's rows, or one per batch element when padded prompts differ per element
    per_batch_prompt = layout.text_valid is not None and layout.text_valid.numel() > 1
    P = B if (L > 1 or per_batch_prompt) else 1
    src = torch.arange(P, device=device) if L > 1 else torch.zeros(P, dtype=torch.long, device=device)

    # the extended key order: the layout's key order, then the text keys (every query attends them)
    order = layout.identity_kv_perm().long()[src]  # (P, H, K)
    K = order.shape[-1]
    if layout.text_kv is not None:
        text = torch.arange(*layout.text_kv, device=device).expand(P, H, -1)
        order = torch.cat([order, text], -1)
    Kx = order.shape[-1]
    real = (order >= 0) & (order < S)
    if layout.text_valid is not None:
        t0, t1 = layout.text_range
        first_pad = t0 + layout.text_valid.long().to(device).expand(B)[:P]  # (P,)
        real &= ~((order >= first_pad[:, None, None]) & (order < t1))
    prefix = F.pad(real.long().cumsum(-1), (1, 0))  # (P, H, Kx + 1): real keys before each position

    # segments in the compacted key list: [prefix[start], prefix[end])
    count = layout.kv_count.long()[src]
    used = torch.arange(G, device=device) < count[..., None]
    start = torch.where(used, layout.kv_start.long()[src].clamp(0, K), 0)
    end = torch.where(used, layout.kv_end.long()[src].clamp(0, K), 0)
    if layout.text_kv is not None:
        start = torch.cat([start, torch.full_like(start[..., :1], K)], -1)
        end = torch.cat([end, torch.full_like(end[..., :1], Kx)], -1)
    flat_prefix = prefix[:, :, None, :].expand(P, H, NQ, Kx + 1)
    c_start = flat_prefix.gather(-1, start)
    c_len = (flat_prefix.gather(-1, end) - c_start).clamp(min=0)
    c_start = torch.where(c_len > 0, c_start, 0)  # empty segments look alike, so equal key lists match

    rows = layout.identity_q_perm().long()[src].view(P, H, NQ, bq)
    skip = (rows < 0) | (rows >= S)
    if layout.dense_q is not None:  # dense rows are computed against every key, outside the block path
        skip |= (rows >= layout.dense_q[0]) & (rows < layout.dense_q[1])
    rows = torch.where(skip, -1, rows)

    # blocks with rows to compute and at least one key; rows without keys stay 0 (LSE -inf)
    lh = torch.arange(P * H, device=device).view(P, H, 1).expand(P, H, NQ)
    live = (~skip).any(-1) & (c_len.sum(-1) > 0)
    blk_lh, blk_rows, blk_start, blk_len = lh[live], rows[live], c_start[live], c_len[live]

    lengths = torch.cat([blk_start[blk_len > 0], blk_len[blk_len > 0]]).unique().tolist()
    unit = math.gcd(*lengths) if lengths else 1
    Kpad = -(-Kx // unit) * unit
    units_per_row = Kpad // unit
    rank = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)  # real keys first, in key order
    keys = torch.where(torch.arange(Kx, device=device) < prefix[..., -1:], order.gather(-1, rank), 0)
    keys = F.pad(keys, (0, Kpad - Kx))  # (P, H, Kpad); filler entries point at token 0, never used
    plan_row = torch.arange(B, device=device) if P > 1 else torch.zeros(B, dtype=torch.long, device=device)
    key_rows = (torch.arange(B * H, device=device).view(B, H, 1) * S + keys[plan_row]).view(-1)

    # query blocks of one (plan row, head) with the same key list (shifted windows at the borders of a
    # tile layout, every block of a dense head) form one item: one gather of their keys, one longer query
    signature = torch.cat([blk_lh[:, None], blk_start, blk_len], 1)
    _, item_of = torch.unique(signature, dim=0, return_inverse=True)
    by_item = torch.argsort(item_of, stable=True)
    sorted_item = item_of[by_item]
    rank_in_item = torch.arange(sorted_item.numel(), device=device) - torch.searchsorted(sorted_item, sorted_item)
    piece = sorted_item * (NQ + 1) + rank_in_item // max_blocks_per_item  # cap the query rows of an item
    _, piece_of = torch.unique(piece, return_inverse=True)
    blocks_per_piece = torch.bincount(piece_of)
    piece_first = F.pad(blocks_per_piece.cumsum(0), (1, 0))[:-1]  # blocks sorted by item are sorted by piece

    # items are (batch, piece) pairs, batch-major; a shared plan row serves every batch element
    batches = torch.arange(B, device=device)[:, None]
    out_position = torch.full((B * H * S,), -1, dtype=torch.long, device=device)
    buckets, q_rows, total = [], [], 0
    for m in blocks_per_piece.unique().tolist():
        pieces = (blocks_per_piece == m).nonzero()[:, 0]
        members = by_item[piece_first[pieces, None] + torch.arange(m, device=device)]  # (n, m) blocks
        lead = members[:, 0]
        piece_rows = blk_rows[members].view(len(pieces), m * bq)
        piece_units = blk_len[lead].sum(-1) // unit
        for lo, hi in _width_groups(piece_units.unique().tolist()):
            pick = (piece_units >= lo) & (piece_units <= hi)
            p_lh = blk_lh[lead[pick]]
            if P > 1:  # plan row p is batch element p
                bh = p_lh  # p * H + h
            else:
                bh = (batches * H + p_lh[None, :]).reshape(-1)
            reps = bh.numel() // p_lh.numel()
            item_rows = piece_rows[pick].repeat(reps, 1)  # (n, m * bq)
            u_len = (blk_len[lead[pick]] // unit).repeat(reps, 1)
            u_cum = u_len.cumsum(-1)
            seg_offset = (blk_start[lead[pick]] // unit).repeat(reps, 1) - (u_cum - u_len)
            n_units = piece_units[pick].repeat(reps)
            unit_base = bh * units_per_row
            W = int(hi)
            unit_index = None
            if bh.numel() * W <= _CACHED_INDEX_ENTRIES:
                unit_index = _expand_units(n_units, u_cum, seg_offset, unit_base, W)
            flat_rows = bh[:, None] * S + item_rows  # (n, r) flat query rows; skipped slots are < bh * S
            valid = item_rows >= 0
            out_position[flat_rows[valid]] = total + torch.arange(flat_rows.numel(), device=device).view_as(flat_rows)[valid]
            q_rows.append(torch.where(valid, flat_rows, bh[:, None] * S).view(-1))
            buckets.append(_Bucket(W * unit, lo != hi, m * bq, total, unit_base, n_units, u_cum, seg_offset, unit_index))
            total += flat_rows.numel()

    if layout.dense_q is not None:
        a, e = layout.dense_q
        flat = (torch.arange(B * H, device=device)[:, None] * S + torch.arange(a, e, device=device)).view(-1)
        out_position[flat] = total + torch.arange(flat.numel(), device=device)
        total += flat.numel()
    out_index = torch.where(out_position >= 0, out_position, total)  # the zero row
    q_rows = torch.cat(q_rows) if q_rows else torch.zeros(0, dtype=torch.long, device=device)
    out_index_bshd = out_index.view(B, H, S).transpose(1, 2).reshape(-1)
    return _GatherPlan(unit, key_rows, q_rows, out_index, out_index_bshd, tuple(buckets))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor | None, scale: float, lse_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (n, r, D) against k (n, m, D), v (n, m, Dv); key_ok (n, m) bool or None.

    Returns out (n, r, Dv) and lse (n, r). Every row has at least one allowed key. Uses the CPU flash
    kernel (which also gives the LSE) where it applies; ``lse_grad``: the LSE itself must carry gradients,
    which only the explicit softmax below provides.
    """
    flash = (
        not lse_grad
        and q.device.type == "cpu"
        and k.shape[-1] == v.shape[-1]  # the flash kernel needs one head dim for K and V
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )
    if flash:
        mask = None
        if key_ok is not None:
            mask = torch.zeros(key_ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_ok, float("-inf"))
            mask = mask[:, None, None, :]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, None], k[:, None], v[:, None], 0.0, False, attn_mask=mask, scale=scale
        )
        return out[:, 0], lse[:, 0].to(q.dtype)
    scores = (q * scale) @ k.transpose(1, 2)  # (n, r, m)
    if key_ok is not None:
        scores = scores.masked_fill(~key_ok[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def _gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float,
    return_lse: bool,
    rows_per_chunk: int,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out (B, S, H, Dv) in q's dtype and, with return_lse, lse (B, H, S) in the work dtype (else None)."""
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    work = _work_dtype(q.dtype)
    max_blocks = max(1, rows_per_chunk // layout.block_q)
    plan: _GatherPlan = layout.cached(
        ("reference_gather_plan", B, max_blocks), lambda: _build_gather_plan(layout, B, max_blocks)
    )
    lse_grad = return_lse and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))

    # (B * H * S, D) rows in (batch, head, token) order, in the work dtype: a free view when the inputs are
    # (B, H, S, D) tensors seen as (B, S, H, D), as diffusers hands them; one copy otherwise
    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).to(work).contiguous().view(B * H * S, x.shape[-1])

    qf = flat(q)
    kv = torch.cat([flat(k), flat(v)], 1)  # K and V side by side: one gather moves both
    u, E = plan.unit, D + Dv
    # every (batch, head)'s compacted key list, unit by unit; (units, u, E) and not (units, u * E): index_select
    # copies rows of a 3-D tensor as blocks, but crawls over very wide rows of a 2-D one
    kv_units = kv.index_select(0, plan.key_rows).view(-1, u, E)
    q_all = qf.index_select(0, plan.q_rows)  # every item's query rows, bucket after bucket
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    size = kv.element_size()
    for bucket in plan.buckets:
        n_items, r, W = bucket.unit_base.numel(), bucket.rows, bucket.width // u
        per_item = (bucket.width * E + r * E) * size
        if lse_grad:  # the explicit softmax holds the scores and the probabilities too
            per_item += 2 * bucket.width * r * size
        step = max(1, chunk_bytes // per_item)
        for first in range(0, n_items, step):
            part = slice(first, min(first + step, n_items))
            n = part.stop - first
            if bucket.unit_index is not None:
                unit_index = bucket.unit_index[part]
            else:
                unit_index = _expand_units(
                    bucket.n_units[part], bucket.seg_cum[part], bucket.seg_offset[part], bucket.unit_base[part], W
                )
            kvs = kv_units.index_select(0, unit_index.reshape(-1)).view(n, bucket.width, E)
            key_ok = None
            if bucket.padded:  # slots past an item's keys (a repeat of its first unit) are masked out
                key_ok = (torch.arange(W, device=q.device) < bucket.n_units[part, None]).repeat_interleave(u, 1)
            qs = q_all[bucket.q_start + first * r : bucket.q_start + part.stop * r].view(n, r, D)
            o, s = _attend(qs, kvs[..., :D], kvs[..., D:], key_ok, scale, lse_grad)
            outs.append(o.reshape(-1, Dv))
            lses.append(s.reshape(-1))
    if layout.dense_q is not None:
        _dense_rows(qf, kv, layout, B, H, S, D, scale, lse_grad, rows_per_chunk, chunk_bytes, outs, lses)
    outs.append(torch.zeros(1, Dv, dtype=work, device=q.device))  # rows without keys
    # gathered straight into (B, S, H, Dv) order: contiguous, the memory layout of dense SDPA's output on the CPU
    # too, so a compiled model sees the same strides from dense and sparse calls (no recompiles)
    out = torch.cat(outs).index_select(0, plan.out_index_bshd).view(B, S, H, Dv).to(q.dtype)
    if not return_lse:
        return out, None
    lses.append(torch.full((1,), float("-inf"), dtype=work, device=q.device))
    return out, torch.cat(lses).index_select(0, plan.out_index).view(B, H, S)


def _dense_rows(
    qf: torch.Tensor,
    kv: torch.Tensor,
    layout: Layout,
    B: int,
    H: int,
    S: int,
    D: int,
    scale: float,
    lse_grad: bool,
    rows_per_chunk: int,
    chunk_bytes: int,
    outs: list[torch.Tensor],
    lses: list[torch.Tensor],
) -> None:
    """Rows of ``layout.dense_q`` attend every key but a batch element's padded prompt keys (cut out).

    Appends their outputs ((batch, head, row) order, as `_GatherPlan.out_index` expects) to outs and lses."""
    a, e = layout.dense_q
    q4, kv4 = qf.view(B, H, S, D), kv.view(B, H, S, -1)
    Dv = kv.shape[-1] - D
    for b in range(B):
        pad = layout.padded_text(b)
        keys = kv4[b]  # (H, S, D + Dv)
        if pad is not None:
            keys = torch.cat([keys[:, : pad[0]], keys[:, pad[1] :]], 1)
        if keys.shape[1] == 0:  # nothing to attend: the rows are 0, LSE -inf
            outs.append(torch.zeros(H * (e - a), Dv, dtype=kv.dtype, device=kv.device))
            lses.append(torch.full((H * (e - a),), float("-inf"), dtype=kv.dtype, device=kv.device))
            continue
        step = rows_per_chunk
        if lse_grad:  # the explicit softmax holds (H, rows, keys) scores and probabilities
            step = max(1, min(step, chunk_bytes // (2 * H * keys.shape[1] * keys.element_size())))
        o_parts, s_parts = [], []
        for s in range(a, e, step):
            o, row_lse = _attend(q4[b, :, s : min(s + step, e)], keys[..., :D], keys[..., D:], None, scale, lse_grad)
            o_parts.append(o)
            s_parts.append(row_lse)
        outs.append(torch.cat(o_parts, 1).reshape(-1, Dv))
        lses.append(torch.cat(s_parts, 1).reshape(-1))
