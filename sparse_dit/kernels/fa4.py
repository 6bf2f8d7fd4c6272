"""Optional FlashAttention-4 engine (``pip install sparse-dit[fa4]``: flash-attn-4, CuTe DSL) behind the same `Layout`.

FA4's block-sparse forward takes FlexAttention-style tables: per (batch, head, query block) a count and a list of
key blocks of 128. A `Layout` maps onto that when everything it keeps is whole key blocks of 128:

- query blocks of a multiple of FA4's query tile (128 on Hopper; 256 on Blackwell, where FA4 runs two query tiles per
  CTA), key segments that start on a multiple of 128 and end on one (or at the end of the key order);
- permutations: q/k/v are gathered into the layout's orders (copies, whose cost the benchmark reports) and the
  output is gathered back; a padded key slot (-1) inside a kept segment is not expressible (FA4 would attend it);
- ``text_kv`` (keys every query attends) when it is whole blocks of the key order, ``dense_q`` (queries that attend
  every key) when it is whole query blocks and there is no permutation; prompt padding (``text_valid`` that cuts
  keys) is not expressible.

Everything else runs on the Triton kernel. Every kept block goes to FA4 as a *full* block (no ``mask_mod``); the
mask-block tables FA4 requires are empty. The last key block may be partial: FA4 masks the sequence end on the first
block it processes, which is the last entry of an ascending list, so indices are kept sorted.

Nothing here imports flash_attn at module import: `fa4_interface` does on first use, and an import failure only
means the engine is absent (`fa4_available` is False).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from sparse_dit.layout import Layout

BLOCK_KV = 128  # FA4's key tile (every architecture it has a block-sparse forward for)
DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=1)
def fa4_interface() -> Any:
    """FA4's ``flash_attn_func`` and ``BlockSparseTensorsTorch`` (a namespace), or None when flash-attn-4 is not
    importable. Memoised: whether a package imports does not change within a process."""
    try:
        interface = importlib.import_module("flash_attn.cute.interface")
        try:
            tensors = importlib.import_module("flash_attn.cute.block_sparsity").BlockSparseTensorsTorch
        except (ImportError, AttributeError):
            tensors = getattr(interface, "BlockSparseTensorsTorch", None)
        return SimpleNamespace(flash_attn_func=interface.flash_attn_func, BlockSparseTensorsTorch=tensors)
    except Exception:  # ImportError, or a broken install (missing CUDA libraries, DSL errors): no engine
        return None


def fa4_available() -> bool:
    """True when flash-attn-4 (``flash_attn.cute``) imports."""
    return fa4_interface() is not None


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device)


def fa4_dense_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FA4 runs dense attention of q (B, Sq, H, D) against k, v (B, Sk, Hkv, D) here (installed, CUDA,
    Hopper or Blackwell, fp16/bf16, head dim a multiple of 8 up to 256 on Hopper / 128 on Blackwell, H % Hkv == 0)."""
    if q.device.type != "cuda" or q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        return False
    if not fa4_available():
        return False
    major = _capability(q)[0]
    if major not in (9, 10, 11):
        return False
    d, dv = q.shape[-1], v.shape[-1]
    top = 256 if major == 9 else 128
    return k.shape[-1] == d and 8 <= min(d, dv) and max(d, dv) <= top and d % 8 == 0 and dv % 8 == 0 and q.shape[2] % k.shape[2] == 0


def fa4_query_granule(q: torch.Tensor) -> int | None:
    """The query-block multiple FA4's block-sparse forward needs on q's device (None: no block-sparse forward)."""
    if q.device.type != "cuda":
        return None
    major = _capability(q)[0]
    return {9: 128, 10: 256, 11: 256}.get(major)


def fa4_sparse_supported(q: torch.Tensor, layout: Layout) -> bool:
    """Whether the FA4 engine can run this call: dense support (`fa4_dense_supported`), the layout's query blocks a
    multiple of the device's granule, and the layout expressible (`fa4_blocks` returns tables, not a reason)."""
    granule = fa4_query_granule(q)
    if granule is None or layout.block_q % granule or not fa4_dense_supported(q, q, q):
        return False
    return isinstance(fa4_blocks(layout), Fa4Blocks)


# ------------------------------------------------------------------------------------------------ conversion
@dataclass(frozen=True)
class Fa4Blocks:
    """A `Layout` as FA4 block-sparse tables (``L`` 1 or the batch, ``NQ`` query blocks, ``W`` the widest list).

    full_cnt: (L, H, NQ) int32; full_idx: (L, H, NQ, W) int32, ascending key-block indices (entries past the count 0).
    q_gather: (L, Q, H) int64 original query row of each query-order position (padding -> 0) or None;
    q_inverse: (L, S, H) int64 query-order position of each original query row, or None;
    kv_gather: (L, K, H) int64 original key of each key-order position (padding -> 0) or None.
    A permutation that is the same for every (batch, head) is stored as (1, N, 1).
    (Sequence before heads, contiguous: the gathers then write (B, N, H, D) outputs that are contiguous.)
    """

    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    block_q: int
    q_len: int
    kv_len: int
    q_gather: torch.Tensor | None = None
    q_inverse: torch.Tensor | None = None
    kv_gather: torch.Tensor | None = None

    def block_mask(self) -> torch.Tensor:
        """(L, H, NQ, NKB) bool: the kept key blocks (for tests)."""
        L, H, NQ, W = self.full_idx.shape
        nkb = -(-self.kv_len // BLOCK_KV)
        used = torch.arange(W, device=self.full_idx.device) < self.full_cnt[..., None]
        mask = torch.zeros(L, H, NQ, nkb + 1, dtype=torch.bool, device=self.full_idx.device)
        mask.scatter_(-1, torch.where(used, self.full_idx.long(), nkb), True)
        return mask[..., :nkb]

    def to_dense_mask(self, seq_len: int) -> torch.Tensor:
        """(L, H, S, S) bool token mask in original order of what FA4 computes with these tables (for tests)."""
        L, H, NQ, _ = self.full_idx.shape
        blocks = self.block_mask()
        rows = blocks.repeat_interleave(self.block_q, 2)[:, :, : self.q_len]  # (L, H, Q, NKB)
        cols = rows.repeat_interleave(BLOCK_KV, 3)[..., : self.kv_len]  # (L, H, Q, K)
        dev = cols.device
        out = torch.zeros(L, H, seq_len, seq_len, dtype=torch.bool, device=dev)
        if self.kv_gather is not None:
            keyed = torch.zeros(L, H, self.q_len, seq_len, dtype=torch.int8, device=dev)
            # padded key slots gather token 0 but are never in a kept block: amax keeps token 0's own entry
            kv = self.kv_gather.transpose(1, 2)
            keyed.scatter_reduce_(-1, kv[:, :, None, :].expand_as(cols), cols.to(torch.int8), reduce="amax")
            cols = keyed.bool()
        if self.q_inverse is not None:
            out = cols.gather(2, self.q_inverse.transpose(1, 2)[..., None].expand(L, H, seq_len, seq_len))
        else:
            out = cols[:, :, :seq_len]
        return out


# A fact a planner may record on a layout it built (in ``Layout._derived``, as the bounds check is): every kept key
# segment starts on a multiple of BLOCK_KV and ends on one or at the end of the key order, no padded key slot (-1)
# lies inside one, and the layout has no text keys, dense rows or prompt padding. `fa4_blocks` then converts it
# without reading anything back on the host (no checks to read, tables of full width), so a layout planned on every
# call (k-means) reaches the Gluon/FA4 engines without a host synchronisation.
WHOLE_KV_BLOCKS = ("whole_kv_blocks", BLOCK_KV)


def mark_whole_kv_blocks(layout: Layout) -> None:
    """Record `WHOLE_KV_BLOCKS` on ``layout`` (its builder guarantees it; nothing is checked). Raises ValueError for a
    layout with text keys, dense rows or prompt padding, which the fact excludes."""
    if layout.text_kv is not None or layout.dense_q is not None or layout.text_valid is not None:
        raise ValueError("mark_whole_kv_blocks: the layout has text keys, dense rows or prompt padding")
    layout._derived[WHOLE_KV_BLOCKS] = True


def fa4_blocks(layout: Layout) -> Fa4Blocks | str:
    """FA4 tables of ``layout``, or a one-line reason why FA4 cannot express it. Cached on the layout."""
    return layout.cached(("fa4_blocks", BLOCK_KV), lambda: _convert(layout))


def _convert(layout: Layout) -> Fa4Blocks | str:
    S, bq, K = layout.seq_len, layout.block_q, layout.kv_order_len
    L, H, NQ = layout.kv_count.shape
    dev = layout.device
    if bq % BLOCK_KV:
        return f"query blocks of {bq} are not a multiple of {BLOCK_KV}"
    if layout._derived.get(WHOLE_KV_BLOCKS):
        return _convert_whole_blocks(layout)
    if layout.text_valid is not None and any(layout.padded_text(b) for b in range(layout.text_valid.numel())):
        return "prompt padding (text_valid) cuts keys inside blocks"
    if layout.dense_q is not None:
        a, b = layout.dense_q
        if layout.q_perm is not None or layout.kv_perm is not None:
            return "dense query rows with a token permutation"
        if a % bq or (b % bq and b != S):
            return f"dense_q={layout.dense_q} is not whole query blocks of {bq}"
    if layout.text_kv is not None:
        a, b = layout.text_kv
        if a % BLOCK_KV or (b % BLOCK_KV and b != K) or b > K:
            return f"text_kv={layout.text_kv} is not whole key blocks of {BLOCK_KV}"
    G = layout.kv_start.shape[-1]
    count = layout.kv_count.long()
    used = torch.arange(G, device=dev) < count[..., None]
    start, end = layout.kv_start.long(), layout.kv_end.long()
    false = torch.zeros((), dtype=torch.bool, device=dev)
    checks = {"unaligned": (used & ((start % BLOCK_KV != 0) | ((end % BLOCK_KV != 0) & (end != K)))).any(),
              "padded": false, "text_moved": false, "q_per_head": false, "kv_per_head": false}
    if layout.kv_perm is not None:
        pads = torch.nn.functional.pad((layout.kv_perm < 0).long().cumsum(-1), (1, 0))[:, :, None, :].expand(L, H, NQ, K + 1)
        padded = pads.gather(-1, end.clamp(0, K)) - pads.gather(-1, start.clamp(0, K))
        checks["padded"] = (used & (padded > 0)).any()
        if layout.text_kv is not None:
            a, b = layout.text_kv
            want = torch.arange(a, b, device=dev, dtype=layout.kv_perm.dtype)
            checks["text_moved"] = (layout.kv_perm[..., a:b] != want).any()
        checks["kv_per_head"] = (layout.kv_perm != layout.kv_perm[:1, :1]).any()
    if layout.q_perm is not None:
        checks["q_per_head"] = (layout.q_perm != layout.q_perm[:1, :1]).any()
    flags = dict(zip(checks, torch.stack(list(checks.values())).tolist()))  # one sync
    if flags["unaligned"]:
        return f"key segments not aligned to blocks of {BLOCK_KV}"
    if flags["padded"]:
        return "a kept key segment holds padded slots of the key order"
    if flags["text_moved"]:
        return "text keys are not in place in the key order"
    mask = _kept_blocks(layout, used, start, end)
    if layout.text_kv is not None:
        a, b = layout.text_kv
        mask[..., a // BLOCK_KV : -(-b // BLOCK_KV)] = True
    if layout.dense_q is not None:
        a, b = layout.dense_q
        mask[:, :, a // bq : -(-b // bq)] = True
    cnt = mask.sum(-1, dtype=torch.int32)
    return _tables(layout, mask, cnt, int(cnt.max()), flags["q_per_head"], flags["kv_per_head"])


def _kept_blocks(layout: Layout, used: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """(L, H, NQ, NKB) bool: the key blocks the used segments [start, end) cover (a difference array, no host read)."""
    L, H, NQ = layout.kv_count.shape
    nkb = -(-layout.kv_order_len // BLOCK_KV)
    sb = torch.where(used, start // BLOCK_KV, nkb)
    eb = torch.where(used, -(-end // BLOCK_KV), nkb)
    diff = torch.zeros(L, H, NQ, nkb + 1, dtype=torch.int32, device=layout.device)
    ones = used.to(torch.int32)
    diff.scatter_add_(-1, sb, ones)
    diff.scatter_add_(-1, eb, -ones)
    return diff.cumsum(-1)[..., :nkb] > 0


def _convert_whole_blocks(layout: Layout) -> Fa4Blocks:
    """`_convert` for a layout carrying `WHOLE_KV_BLOCKS`: nothing to check, the index table as wide as the key
    blocks (no max read back), permutations kept per (batch, head). Device ops only."""
    G = layout.kv_start.shape[-1]
    used = torch.arange(G, device=layout.device) < layout.kv_count.long()[..., None]
    mask = _kept_blocks(layout, used, layout.kv_start.long(), layout.kv_end.long())
    return _tables(layout, mask, mask.sum(-1, dtype=torch.int32), mask.shape[-1], True, True)


def _tables(layout: Layout, mask: torch.Tensor, cnt: torch.Tensor, W: int, q_per_head: bool, kv_per_head: bool
            ) -> Fa4Blocks:
    """Fa4Blocks from the kept-block mask (L, H, NQ, NKB) and its counts: ascending indices in a (..., max(W, 1))
    table and the gathers of the layout's permutations (each kept per (batch, head) or, when shared, as one
    (1, N, 1) index)."""
    S, bq, K = layout.seq_len, layout.block_q, layout.kv_order_len
    L, H, NQ, nkb = mask.shape
    dev = mask.device
    W = max(1, W)
    pos = torch.where(mask, mask.cumsum(-1) - 1, W)
    idx = torch.zeros(L, H, NQ, W + 1, dtype=torch.int32, device=dev)
    idx.scatter_(-1, pos, torch.arange(nkb, dtype=torch.int32, device=dev).expand(L, H, NQ, nkb).contiguous())
    # a permutation shared by every batch element and head (the tile pattern's) is kept as one (1, N, 1) index:
    # `gather_rows` then copies whole rows (index_select) instead of gathering per head
    q_gather = q_inverse = kv_gather = None
    if layout.q_perm is not None:
        perm = layout.q_perm.long()
        if not q_per_head:
            perm = perm[:1, :1]
        Lp, Hp = perm.shape[:2]
        q_gather = perm.clamp(min=0).transpose(1, 2).contiguous()
        inv = torch.zeros(Lp, Hp, S + 1, dtype=torch.long, device=dev)
        positions = torch.arange(perm.shape[-1], device=dev).expand(Lp, Hp, -1)
        inv.scatter_(-1, torch.where(perm >= 0, perm, S), positions.contiguous())
        q_inverse = inv[..., :S].transpose(1, 2).contiguous()
    if layout.kv_perm is not None:
        perm = layout.kv_perm.long() if kv_per_head else layout.kv_perm[:1, :1].long()
        kv_gather = perm.clamp(min=0).transpose(1, 2).contiguous()
    return Fa4Blocks(cnt.contiguous(), idx[..., :W].contiguous(), bq, layout.q_order_len, K, q_gather, q_inverse, kv_gather)


# ------------------------------------------------------------------------------------------------- execution
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, M, H, D) contiguous copy of x (B, N, H, D) with row ``index[l, m, h]`` of head h at position m (index
    (L, M, H) contiguous, L 1 or B; (1, M, 1): the same rows for every batch element and head)."""
    if index.shape[0] == 1 and index.shape[2] == 1:
        return x.index_select(1, index.view(-1))
    B, _, H, _ = x.shape
    idx = index.expand(B, -1, -1)
    b = torch.arange(B, device=x.device)[:, None, None]
    h = torch.arange(H, device=x.device)[None, None, :]
    return x[b, idx, h]


def _unpack(result: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(result, tuple):
        return result[0], (result[1] if len(result) > 1 else None)
    return result, None


def fa4_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of q (B, S, H, D) against k, v over ``layout`` on FA4; the contract of
    `sparse_dit.kernels.block_sparse_attention` (out (B, S, H, D), lse (B, H, S) float32 natural log).
    Raises ValueError for a layout FA4 cannot express (see `fa4_blocks`), RuntimeError without flash-attn-4."""
    fa4 = fa4_interface()
    if fa4 is None:
        raise RuntimeError("sparse-dit: flash-attn-4 is not installed (pip install 'sparse-dit[fa4]'); use the Triton kernel")
    blocks = fa4_blocks(layout)
    if isinstance(blocks, str):
        raise ValueError(f"sparse-dit: the FA4 engine cannot express this layout ({blocks}); use the Triton kernel")
    tables = fa4.BlockSparseTensorsTorch(
        mask_block_cnt=torch.zeros_like(blocks.full_cnt),
        mask_block_idx=torch.zeros_like(blocks.full_idx[..., :1]),
        full_block_cnt=blocks.full_cnt,
        full_block_idx=blocks.full_idx,
        block_size=(blocks.block_q, BLOCK_KV),
    )
    if blocks.q_gather is not None:
        q = gather_rows(q, blocks.q_gather)
    if blocks.kv_gather is not None:
        k, v = gather_rows(k, blocks.kv_gather), gather_rows(v, blocks.kv_gather)
    out, lse = _unpack(fa4.flash_attn_func(q, k, v, softmax_scale=scale, block_sparse_tensors=tables, return_lse=return_lse))
    if blocks.q_inverse is not None:
        out = gather_rows(out, blocks.q_inverse)
        if return_lse:
            lse = lse.gather(2, blocks.q_inverse.transpose(1, 2).expand(lse.shape[0], lse.shape[1], -1))
    return (out, lse) if return_lse else out


def fa4_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
) -> torch.Tensor:
    """Dense attention of q (B, Sq, H, D) against k, v (B, Sk, Hkv, D) on FA4; returns (B, Sq, H, D)."""
    fa4 = fa4_interface()
    if fa4 is None:
        raise RuntimeError("sparse-dit: flash-attn-4 is not installed (pip install 'sparse-dit[fa4]')")
    return _unpack(fa4.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))[0]
