"""Fused block-sparse attention forward in Triton, over a `Layout` (all heads of a layer in one launch).

One program computes one query block (``layout.block_q`` rows of the query order) of one (batch, head):
an online softmax (exp2, log2(e) folded into the scale, fp32 accumulators) over

1. the key *chunks* of its segments: every segment ``[start, end)`` of the key order is cut into chunks
   of ``BLOCK_N`` keys. The chunks are flattened, per query block, into a small table (built once per
   layout and cached): first every full chunk (no masking at all on the identity path), then the one
   partial tail chunk of each segment whose length is not a multiple of ``BLOCK_N`` (masked). One flat
   loop over the table keeps the software pipeline full across segment boundaries, which a loop per
   segment would drain at every (often one-block-long) segment;
2. the ``text_kv`` range of original key positions (unpermuted), if any.

Extra programs of the same launch (placed first: they are the longest) compute the ``dense_q`` rows of
the original order against every key; the block path skips those rows.

Permutations (``q_perm``/``kv_perm``) are applied in one of three ways, all tested:

* ``permute="fused"``: the kernel gathers query/key/value rows through the index tensors (row pointers
  from the permutation, one 16-byte-vectorised row load per key) and stores the output rows straight back
  to their original positions;
* ``permute="kv_copy"``: a small gather kernel writes permuted contiguous copies of k and v, which the
  attention kernel reads in order (through TMA on Hopper); query rows are gathered and output rows stored
  as in "fused". The default on Hopper without padded prompts (``"auto"``): measured +7.8% over unpermuted keys against +18.1% for
  "fused" at Wan 480p, 10% density (H200; benchmarks/results/kernel.md), for two (B, H, S, D) copies held
  during the call; "fused" elsewhere (without TMA the copies buy nothing);
* ``permute="separate"``: permuted copies of q, k and v, the in-order kernel, which writes a permuted
  output, and a scatter kernel that puts rows back in the original order.

q, k, v are (B, S, H, D) tensors of any strides (views of a fused qkv or of a (B, H, S, D) tensor are
read in place); the output is a new contiguous (B, S, H, D) tensor in the original token order.
A row whose segments hold only padding slots (and no text keys) has no key: its output is 0 and its LSE -inf.
Keys a row does not attend never contribute: masked lanes have their values zeroed, so a NaN or Inf there stays out.
Padded prompts (``layout.text_valid``/``text_range``): the padded keys are skipped by the dense rows and the
text-key loop (range splitting, no masking) and masked inside segments.

On Hopper the full unpermuted key chunks are loaded through TMA tensor descriptors; measured configs and
numbers are in benchmarks/results/kernel.md and benchmarks/notes_kernel.md.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from sparse_dit.layout import Layout

from .reference import check_qkv

__all__ = ["triton_block_sparse_attention", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "default_config"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
PERMUTE_MODES = ("auto", "fused", "separate", "kv_copy")  # how a permuted layout's rows are read (module docstring)
# the mode used when a call does not name one; benchmarks compare modes end to end by setting it before a run
# (benchmarks/results/kernel.md, "Permutation overhead")
DEFAULT_PERMUTE = "auto"
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _attend_chunk(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    stride_ks,
    stride_vs,
    rows,
    valid,
    offs_d,
    qk_scale,
    HAS_VALID: tl.constexpr,
    LOAD_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One online-softmax step of a query tile against the key rows ``rows`` (BLOCK_N,) of K/V.

    ``valid`` (BLOCK_N,) bool masks keys to -inf when HAS_VALID; LOAD_MASK also masks the loads (rows that
    may lie outside the tensor). m_i is kept in the log2 domain of the scaled scores.
    """
    rows64 = rows.to(tl.int64)
    k_ptrs = K + rows64[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + rows64[:, None] * stride_vs + offs_d[None, :]
    if LOAD_MASK:
        lm = valid[:, None]
        if BLOCK_D != HEAD_DIM:
            lm = lm & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=lm, other=0.0)
        v = tl.load(v_ptrs, mask=lm, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        dm = offs_d[None, :] < HEAD_DIM
        k = tl.load(k_ptrs, mask=dm, other=0.0)
        v = tl.load(v_ptrs, mask=dm, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if HAS_VALID and not LOAD_MASK:
        # masked lanes loaded some real row (token 0 for a padding slot, a padded prompt key): its score is -inf
        # and its weight 0, but 0 * NaN/Inf in the value would still reach the row, so zero those values
        v = tl.where(valid[:, None], v, 0.0)
    return _softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale, HAS_VALID, DOT_PREC)


@triton.jit
def _attend_chunk_tma(acc, m_i, l_i, q, k_desc, v_desc, b, h, start, qk_scale,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """A full chunk of keys [start, start + BLOCK_N) of (b, h) through TMA tensor descriptors (Hopper)."""
    k = k_desc.load([b, start, h, 0]).reshape([BLOCK_N, BLOCK_D])
    v = v_desc.load([b, start, h, 0]).reshape([BLOCK_N, BLOCK_D])
    return _softmax_step(acc, m_i, l_i, q, k, v, start, qk_scale, False, DOT_PREC)


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale, HAS_VALID: tl.constexpr, DOT_PREC: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if HAS_VALID:
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a chunk whose keys are all masked (padding) must not turn -inf - -inf into NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


# ---- experimental clean-chunk loop (opt-in: config "PREFETCH_IDX"; see benchmarks/notes_kernel.md)
@triton.jit
def _gather_rows(kvperm_base, fs_row, t, n, offs_n, pad_a, pad_b):
    """Gather path: (rows of the K/V bases = original positions, key valid mask) of clean chunk ``t`` of the
    chunk-table row ``fs_row``. Every load is masked by ``t < n``, so ``t`` may run past the table
    (prefetching): the values are then unused."""
    start = tl.load(fs_row + t, mask=t < n, other=0)
    vlive = (offs_n * 0 + t) < n  # a vector mask (the interpreter neither broadcasts a scalar one nor `&`s it)
    pos = start + offs_n
    rows = tl.load(kvperm_base + pos, mask=vlive, other=0)
    ok = (rows < pad_a) | (rows >= pad_b)
    return rows, ok


@triton.jit
def _clean_loop_prefetch(
    acc, m_i, l_i, q, kb_base, vb_base, skb, svb, kvperm_base, fs_row, n, offs_n, offs_d, pad_a, pad_b, qk_scale,
    HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """The gather path's clean-chunk loop with the kv_perm indices (the key rows) of chunk t + 1 loaded during
    chunk t and carried in registers, so the row loads' addresses do not wait on an index load. On sm_90
    (triton 3.6) this lets the pipeliner keep the K/V row loads two iterations ahead (three buffers) as on
    the TMA path; the default gather loop's index -> row chain leaves them one iteration ahead. Measured on
    the H100 within run-to-run noise of the default loop (benchmarks/results/kernel.md), so it stays opt-in."""
    r_f, ok_f = _gather_rows(kvperm_base, fs_row, 0, n, offs_n, pad_a, pad_b)
    for t in range(0, n):
        rows = r_f
        ok = ok_f
        r_f, ok_f = _gather_rows(kvperm_base, fs_row, t + 1, n, offs_n, pad_a, pad_b)
        acc, m_i, l_i = _attend_chunk(
            acc, m_i, l_i, q, kb_base, vb_base, skb, svb, rows, ok, offs_d, qk_scale,
            HAS_PAD, False, HEAD_DIM, BLOCK_D, DOT_PREC,
        )
    return acc, m_i, l_i


@triton.jit
def _attend_range(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    stride_ks,
    stride_vs,
    lo,
    hi,
    offs_d,
    qk_scale,
    k_desc,
    v_desc,
    b,
    h,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Keys [lo, hi) of the original order, unpermuted: full chunks unmasked, then the masked tail."""
    offs_n = tl.arange(0, BLOCK_N)
    n_full = tl.maximum(hi - lo, 0) // BLOCK_N
    for t in range(0, n_full):
        if USE_TMA:
            acc, m_i, l_i = _attend_chunk_tma(
                acc, m_i, l_i, q, k_desc, v_desc, b, h, lo + t * BLOCK_N, qk_scale, BLOCK_N, BLOCK_D, DOT_PREC
            )
        else:
            rows = lo + t * BLOCK_N + offs_n
            acc, m_i, l_i = _attend_chunk(
                acc, m_i, l_i, q, K, V, stride_ks, stride_vs, rows, rows < hi, offs_d, qk_scale,
                False, False, HEAD_DIM, BLOCK_D, DOT_PREC,
            )
    tail = lo + n_full * BLOCK_N
    if tail < hi:
        rows = tail + offs_n
        acc, m_i, l_i = _attend_chunk(
            acc, m_i, l_i, q, K, V, stride_ks, stride_vs, rows, rows < hi, offs_d, qk_scale,
            True, True, HEAD_DIM, BLOCK_D, DOT_PREC,
        )
    return acc, m_i, l_i


@triton.jit
def _finish_and_store(
    acc, m_i, l_i, O, stride_os, rows, row_ok, offs_d, LSE, stride_ls,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    has_keys = l_i > 0.0
    inv = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    out = acc * inv[:, None]
    rows64 = rows.to(tl.int64)
    smask = row_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        smask = smask & (offs_d[None, :] < HEAD_DIM)
    tl.store(O + rows64[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=smask)
    if RETURN_LSE:
        lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + rows64 * stride_ls, lse, mask=row_ok)


@triton.jit
def _block_sparse_fwd(
    # original tensors (text keys, dense rows, and every read/write on the identity/fused paths)
    Q, K, V, O, LSE,
    sq_b, sq_s, sq_h,
    sk_b, sk_s, sk_h,
    sv_b, sv_s, sv_h,
    so_b, so_s, so_h,
    sl_b, sl_h,
    # block-path sources/destinations (the permuted copies on the separate path, else the originals)
    QB, KB, VB, OB, LSEB,
    sqb_b, sqb_s, sqb_h,
    skb_b, skb_s, skb_h,
    svb_b, svb_s, svb_h,
    sob_b, sob_s, sob_h,
    slb_b, slb_h,
    # layout
    QPERM, KVPERM, NFULL, NCLEAN, FULL_START, NPART, PART_START, PART_END,
    S, H, NQ, Q_ORDER, KV_ORDER, CF, CP, L_MULT,
    TEXT_A, TEXT_B, DENSE_A, DENSE_B, N_DENSE_PROGS, BLOCK_Q,
    TEXT_VALID, TV_MULT, PAD_END,
    K_DESC, V_DESC,
    KB_DESC, VB_DESC,  # TMA descriptors over the permuted K/V copies (KV_MODE 2), else K_DESC/V_DESC again
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    Q_MODE: tl.constexpr,  # 0 identity, 1 gather through q_perm, 2 permuted copy QB (rows valid by q_perm)
    KV_MODE: tl.constexpr,  # 0 identity, 1 gather through kv_perm, 2 permuted copies KB/VB
    HAS_TEXT: tl.constexpr,
    HAS_DENSE: tl.constexpr,
    HAS_PAD: tl.constexpr,  # padded prompt: keys [PAD_START[b], PAD_END) are attended by nobody
    RETURN_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,  # full unpermuted key chunks through TMA descriptors (GPU, HEAD_DIM == BLOCK_D)
    USE_WS: tl.constexpr,  # experimental: warp-specialised clean-chunk loop (TMA, identity keys, no padding)
    USE_PREFETCH: tl.constexpr = False,  # experimental: kv_perm indices one chunk ahead (gather path)
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_base = Q + b64 * sq_b + h64 * sq_h
    k_base = K + b64 * sk_b + h64 * sk_h
    v_base = V + b64 * sv_b + h64 * sv_h
    o_base = O + b64 * so_b + h64 * so_h
    lse_base = LSE + b64 * sl_b + h64 * sl_h

    if HAS_PAD:
        pad_a = tl.load(TEXT_VALID + b * TV_MULT)  # (text_range start + valid text keys of element b)
        pad_b = PAD_END
    else:
        pad_a = S
        pad_b = S

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    is_dense_prog = False
    if HAS_DENSE:
        is_dense_prog = pid < N_DENSE_PROGS
    if is_dense_prog:
        # ---- dense query rows (original order) against every key
        rows = DENSE_A + pid * BLOCK_M + offs_m
        row_ok = rows < DENSE_B
        q = tl.load(q_base + rows.to(tl.int64)[:, None] * sq_s + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, 0, pad_a, offs_d, qk_scale, K_DESC, V_DESC, b, h, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA
        )
        if HAS_PAD:
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, pad_b, S, offs_d, qk_scale, K_DESC, V_DESC, b, h, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA
            )
        _finish_and_store(acc, m_i, l_i, o_base, so_s, rows, row_ok, offs_d, lse_base, 1, HEAD_DIM, BLOCK_D, RETURN_LSE)
    else:
        qb = pid - N_DENSE_PROGS
        l64 = (b * L_MULT).to(tl.int64)
        lh = l64 * H + h64
        pos = qb * BLOCK_Q + offs_m
        in_block = (offs_m < BLOCK_Q) & (pos < Q_ORDER)
        if Q_MODE == 0:
            orig = pos
            row_ok = in_block & (pos < S)
        else:
            orig = tl.load(QPERM + lh * Q_ORDER + pos, mask=in_block, other=-1)
            row_ok = orig >= 0
        if HAS_DENSE:
            row_ok = row_ok & ((orig < DENSE_A) | (orig >= DENSE_B))
        if Q_MODE == 2:
            qb_base = QB + b64 * sqb_b + h64 * sqb_h
            q = tl.load(qb_base + pos.to(tl.int64)[:, None] * sqb_s + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            q = tl.load(q_base + orig.to(tl.int64)[:, None] * sq_s + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        if KV_MODE == 2:
            kb_base = KB + b64 * skb_b + h64 * skb_h
            vb_base = VB + b64 * svb_b + h64 * svb_h
            skb = skb_s
            svb = svb_s
        else:
            kb_base = k_base
            vb_base = v_base
            skb = sk_s
            svb = sv_s
        kvperm_base = KVPERM + lh * KV_ORDER
        tab = lh * NQ + qb
        # ---- full chunks without padding slots ("clean"): no score masking unless prompts are padded
        n_clean = tl.load(NCLEAN + tab)
        if USE_PREFETCH:
            acc, m_i, l_i = _clean_loop_prefetch(
                acc, m_i, l_i, q, kb_base, vb_base, skb, svb, kvperm_base, FULL_START + tab * CF, n_clean, offs_n,
                offs_d, pad_a, pad_b, qk_scale, HAS_PAD, HEAD_DIM, BLOCK_D, DOT_PREC,
            )
        elif USE_WS:
            for t in tl.range(0, n_clean, warp_specialize=True):
                start = tl.load(FULL_START + tab * CF + t)
                acc, m_i, l_i = _attend_chunk_tma(
                    acc, m_i, l_i, q, K_DESC, V_DESC, b, h, start, qk_scale, BLOCK_N, BLOCK_D, DOT_PREC
                )
        else:
            for t in range(0, n_clean):
                start = tl.load(FULL_START + tab * CF + t)
                n = start + offs_n
                if KV_MODE == 0 and USE_TMA and not HAS_PAD:
                    acc, m_i, l_i = _attend_chunk_tma(
                        acc, m_i, l_i, q, K_DESC, V_DESC, b, h, start, qk_scale, BLOCK_N, BLOCK_D, DOT_PREC
                    )
                elif KV_MODE == 2 and USE_TMA and not HAS_PAD:
                    # the permuted copies are in key order: a clean chunk is BLOCK_N consecutive rows, so TMA
                    acc, m_i, l_i = _attend_chunk_tma(
                        acc, m_i, l_i, q, KB_DESC, VB_DESC, b, h, start, qk_scale, BLOCK_N, BLOCK_D, DOT_PREC
                    )
                elif KV_MODE == 0:
                    acc, m_i, l_i = _attend_chunk(
                        acc, m_i, l_i, q, kb_base, vb_base, skb, svb, n, (n < pad_a) | (n >= pad_b), offs_d, qk_scale,
                        HAS_PAD, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )
                elif KV_MODE == 1:
                    idx = tl.load(kvperm_base + n)
                    acc, m_i, l_i = _attend_chunk(
                        acc, m_i, l_i, q, kb_base, vb_base, skb, svb, idx, (idx < pad_a) | (idx >= pad_b), offs_d,
                        qk_scale, HAS_PAD, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )
                else:
                    if HAS_PAD:
                        idx = tl.load(kvperm_base + n)
                        ok = (idx < pad_a) | (idx >= pad_b)
                    else:
                        ok = n >= 0
                    acc, m_i, l_i = _attend_chunk(
                        acc, m_i, l_i, q, kb_base, vb_base, skb, svb, n, ok, offs_d, qk_scale,
                        HAS_PAD, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )
        # ---- full chunks that hold padding slots of kv_perm (masked)
        if KV_MODE != 0:
            n_full = tl.load(NFULL + tab)
            for t in range(n_clean, n_full):
                start = tl.load(FULL_START + tab * CF + t)
                n = start + offs_n
                idx = tl.load(kvperm_base + n)
                ok = (idx >= 0) & ((idx < pad_a) | (idx >= pad_b))
                if KV_MODE == 1:
                    acc, m_i, l_i = _attend_chunk(
                        acc, m_i, l_i, q, kb_base, vb_base, skb, svb, tl.maximum(idx, 0), ok, offs_d, qk_scale,
                        True, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )
                else:
                    acc, m_i, l_i = _attend_chunk(
                        acc, m_i, l_i, q, kb_base, vb_base, skb, svb, n, ok, offs_d, qk_scale,
                        True, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )
        # ---- partial tail chunks of the segments (masked)
        n_part = tl.load(NPART + tab)
        for t in range(0, n_part):
            start = tl.load(PART_START + tab * CP + t)
            end = tl.load(PART_END + tab * CP + t)
            n = start + offs_n
            inside = n < end
            if KV_MODE == 0:
                acc, m_i, l_i = _attend_chunk(
                    acc, m_i, l_i, q, kb_base, vb_base, skb, svb, n, inside & ((n < pad_a) | (n >= pad_b)), offs_d, qk_scale,
                    True, True, HEAD_DIM, BLOCK_D, DOT_PREC,
                )
            elif KV_MODE == 1:
                idx = tl.load(kvperm_base + n, mask=inside, other=-1)
                ok = (idx >= 0) & ((idx < pad_a) | (idx >= pad_b))
                acc, m_i, l_i = _attend_chunk(
                    acc, m_i, l_i, q, kb_base, vb_base, skb, svb, tl.maximum(idx, 0), ok, offs_d, qk_scale,
                    True, False, HEAD_DIM, BLOCK_D, DOT_PREC,
                )
            else:
                idx = tl.load(kvperm_base + n, mask=inside, other=-1)
                ok = (idx >= 0) & ((idx < pad_a) | (idx >= pad_b))
                acc, m_i, l_i = _attend_chunk(
                    acc, m_i, l_i, q, kb_base, vb_base, skb, svb, n, ok, offs_d, qk_scale,
                    True, True, HEAD_DIM, BLOCK_D, DOT_PREC,
                )
        # ---- text keys, attended by every query block (original order)
        if HAS_TEXT:
            # text keys minus the padded ones: [TEXT_A, pad_a) and [pad_b, TEXT_B), clipped to the text range
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, TEXT_A, tl.minimum(tl.maximum(pad_a, TEXT_A), TEXT_B),
                offs_d, qk_scale, K_DESC, V_DESC, b, h, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA,
            )
            if HAS_PAD:
                acc, m_i, l_i = _attend_range(
                    acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, tl.minimum(tl.maximum(pad_b, TEXT_A), TEXT_B), TEXT_B,
                    offs_d, qk_scale, K_DESC, V_DESC, b, h, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA,
                )
        if Q_MODE == 2:
            ob_base = OB + b64 * sob_b + h64 * sob_h
            lb_base = LSEB + b64 * slb_b + h64 * slb_h
            _finish_and_store(acc, m_i, l_i, ob_base, sob_s, pos, row_ok, offs_d, lb_base, 1, HEAD_DIM, BLOCK_D, RETURN_LSE)
        else:
            _finish_and_store(acc, m_i, l_i, o_base, so_s, orig, row_ok, offs_d, lse_base, 1, HEAD_DIM, BLOCK_D, RETURN_LSE)


@triton.jit
def _permute_rows(
    SRC, DST, IDX, LSRC, LDST,
    ss_b, ss_s, ss_h,
    sd_b, sd_s, sd_h,
    sls_b, sls_h, sld_b, sld_h,
    N, H, L_MULT, DENSE_A, DENSE_B,
    SCATTER: tl.constexpr,
    HAS_DENSE: tl.constexpr,
    WITH_LSE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Gather: DST[b, i, h] = SRC[b, IDX[l, h, i], h] (zeros for -1). Scatter: DST[b, IDX[l, h, i], h] = SRC[b, i, h]
    for IDX >= 0 outside the dense rows (and the same for the (B, H, *) LSE rows when WITH_LSE)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    l64 = b64 * L_MULT
    i = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    in_range = i < N
    idx = tl.load(IDX + (l64 * H + h64) * N + i, mask=in_range, other=-1)
    ok = idx >= 0
    if HAS_DENSE:
        ok = ok & ((idx < DENSE_A) | (idx >= DENSE_B))
    if SCATTER:
        src_row = i.to(tl.int64)
        dst_row = tl.maximum(idx, 0).to(tl.int64)
    else:
        src_row = tl.maximum(idx, 0).to(tl.int64)
        dst_row = i.to(tl.int64)
    vals = tl.load(
        SRC + b64 * ss_b + h64 * ss_h + src_row[:, None] * ss_s + offs_d[None, :],
        mask=ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if SCATTER:
        st = ok
    else:
        st = in_range
    tl.store(DST + b64 * sd_b + h64 * sd_h + dst_row[:, None] * sd_s + offs_d[None, :], vals, mask=st[:, None] & d_ok[None, :])
    if WITH_LSE:
        lv = tl.load(LSRC + b64 * sls_b + h64 * sls_h + src_row, mask=ok, other=0.0)
        tl.store(LDST + b64 * sld_b + h64 * sld_h + dst_row, lv, mask=ok)


# ------------------------------------------------------------------------------------------ chunk tables


def _build_chunk_tables(
    layout: Layout, block_n: int, device: torch.device, full_width: int | None = None, tail_width: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Per (l, h, query block): the full BLOCK_N-chunks of its segments as one flat start table, and the
    partial tail chunk of each segment as (start, end); full chunks without kv_perm padding slots
    ("clean", ``n_clean`` of them) come first. Returns (n_full, n_clean, full_start, n_part, part_start, part_end).
    full_width / tail_width: the tables' widths; None reads the largest counts back to the host (one sync), a
    planner that knows bounds passes them and builds without one (entries past the counts are 0)."""
    count = layout.kv_count.to(device).long()
    start = layout.kv_start.to(device).long()
    end = layout.kv_end.to(device).long()
    G = start.shape[-1]
    used = torch.arange(G, device=device) < count[..., None]
    length = torch.where(used, end - start, 0).clamp(min=0)
    nfull = length // block_n
    has_tail = (length - nfull * block_n) > 0
    n_full = nfull.sum(-1)
    n_part = has_tail.sum(-1)
    cf = full_width if full_width is not None else max(1, int(n_full.max()) if n_full.numel() else 1)
    cp = tail_width if tail_width is not None else max(1, int(n_part.max()) if n_part.numel() else 1)
    cum = nfull.cumsum(-1).contiguous()
    c = torch.arange(cf, device=device).expand(*cum.shape[:-1], cf).contiguous()
    g = torch.searchsorted(cum, c, right=True).clamp(max=G - 1)
    first = (cum - nfull).gather(-1, g)
    full_start = start.gather(-1, g) + (c - first) * block_n
    full_start = torch.where(c < n_full[..., None], full_start, 0)
    order = torch.sort((~has_tail).to(torch.int8), dim=-1, stable=True).indices[..., :cp]
    part_start = (start + nfull * block_n).gather(-1, order)
    part_end = end.gather(-1, order)
    keep = torch.arange(part_start.shape[-1], device=device) < n_part[..., None]
    part_start = torch.where(keep, part_start, 0)
    part_end = torch.where(keep, part_end, 0)
    if part_start.shape[-1] < cp:  # G < cp cannot happen, but keep the width the kernel is told
        pad = cp - part_start.shape[-1]
        part_start = torch.nn.functional.pad(part_start, (0, pad))
        part_end = torch.nn.functional.pad(part_end, (0, pad))
    n_clean = n_full
    if layout.kv_perm is not None:  # full chunks holding padding slots (-1) go last and are masked
        kv_perm = layout.kv_perm.to(device)
        L, H = kv_perm.shape[:2]
        prefix = torch.nn.functional.pad((kv_perm < 0).long().cumsum(-1), (1, 0))  # (L, H, K + 1)
        NQ = full_start.shape[2]
        flat = prefix[:, :, None, :].expand(L, H, NQ, prefix.shape[-1])
        valid = c < n_full[..., None]
        n_pad = flat.gather(-1, (full_start + block_n).clamp(max=prefix.shape[-1] - 1)) - flat.gather(-1, full_start)
        dirty = valid & (n_pad > 0)
        rank = torch.where(valid, dirty.long(), 2)
        order = torch.sort(rank, dim=-1, stable=True).indices
        full_start = full_start.gather(-1, order)
        n_clean = (valid & ~dirty).sum(-1)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return i32(n_full), i32(n_clean), i32(full_start), i32(n_part), i32(part_start), i32(part_end)


def _chunk_tables(layout: Layout, block_n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Cached on the layout object (layouts are immutable) per BLOCK_N and device."""
    return layout.cached(("triton_chunks", block_n, str(device)), lambda: _build_chunk_tables(layout, block_n, device))


def _padding(layout: Layout, batch: int, device: torch.device) -> tuple[torch.Tensor | None, int, int]:
    """Padded prompt keys (``layout.text_valid``): (first padded key per batch element as int32 (1 or B,),
    batch multiplier, end of the padded range), or (None, 0, 0) when no element has padding. Cached."""
    text_valid = getattr(layout, "text_valid", None)
    if text_valid is None:
        return None, 0, 0
    def build() -> tuple[torch.Tensor | None, int, int]:
        a, b = layout.text_range
        tv = text_valid.to(device).reshape(-1).to(torch.int32)
        if tv.numel() not in (1, batch):
            raise ValueError(f"layout.text_valid must have 1 or {batch} entries; got {tv.numel()}")
        start = (tv + a).clamp(max=b).contiguous()
        return (start, 1 if tv.numel() > 1 else 0, b) if bool((start < b).any()) else (None, 0, 0)

    return layout.cached(("triton_padding", str(device)), build)


# ---------------------------------------------------------------------------------------------- configs
def default_config(head_dim: int, block_m: int, dtype: torch.dtype) -> dict:
    """(BLOCK_N, num_warps, num_stages, TMA) for the GPU, from the H100 sweep in benchmarks/results/kernel.md
    (BLOCK_N=128 / 8 warps / 3 stages / TMA: 451-459 TFLOP/s at 10% vs 360 for BLOCK_N=64 without TMA).
    "WS": True (warp-specialised loop) is accepted but measured no faster, so it is off by default.
    "PREFETCH_IDX": True (experimental) loads the next chunk's kv_perm indices one iteration ahead on the fused
    gather path (no effect elsewhere); measured within noise of the default (benchmarks/results/kernel.md,
    "Variants"), so it is off by default. num_warps must be a power of two (Triton's NVIDIA backend refuses 12)."""
    if _interpreting():
        return {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    bd = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if block_m >= 128:  # measured on H100, Wan 480p, D=128 (benchmarks/notes_kernel.md)
        return {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "TMA": True}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "TMA": True}


_CONFIG_KEYS = frozenset({"BLOCK_N", "num_warps", "num_stages", "TMA", "WS", "PREFETCH_IDX"})


def _tma_ok(k: torch.Tensor, v: torch.Tensor, block_n: int) -> bool:
    """TMA descriptors need a Hopper+ GPU, 16-byte aligned bases and strides (not under the interpreter)."""
    if _interpreting() or k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    e = k.element_size()
    return all(t.data_ptr() % 16 == 0 and all((st * e) % 16 == 0 for st in t.stride()[:-1]) for t in (k, v))


def resolve_permute(permute: str, has_kv_perm: bool, tma: bool) -> str:
    """The permutation mode a call runs: "auto" is "kv_copy" when keys are permuted and the copies would be read
    through TMA (``tma``: TMA loads in use and no padded prompt), else "fused" (no copies)."""
    if permute != "auto":
        return permute
    return "kv_copy" if has_kv_perm and tma else "fused"


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a (B, S, H, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


# ------------------------------------------------------------------------------------------------ entry
def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    permute: str | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of q (B, S, H, D) against k, v over ``layout``; same contract as
    `reference_attention`. Returns out (B, S, H, D) and, with ``return_lse``, lse (B, H, S) float32 (natural log).

    ``permute``: "fused" (gather rows inside the kernel), "separate" (permuted copies of q, k, v, then the
    in-order kernel, then a scatter of the output), "kv_copy" (permuted copies of k and v only, read through TMA
    on Hopper; query rows gathered and outputs scattered inside the kernel) or "auto" (kv_copy where TMA loads run
    and the prompt is not padded, else fused); only matters when the layout has key permutations; None:
    ``DEFAULT_PERMUTE`` ("auto"). The copies cost two (B, H, S, D) buffers for the duration of the call.
    ``out``/``lse``: optional preallocated (B, S, H, D) / (B, H, S) outputs (for tests that poison them).
    ``config``: override of ``default_config`` (BLOCK_N, num_warps, num_stages), for benchmarks.
    """
    check_qkv(q, k, v, layout)
    layout.check_bounds()  # out-of-range segments or permutation entries would make the kernel read out of bounds
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "the Triton kernel is forward-only (no backward): call it under torch.no_grad(), or use "
            "sparse_dit.kernels.block_sparse_attention, which runs the differentiable reference when gradients are needed"
        )
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1); use reference_attention on CPU")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton kernel supports float16, bfloat16 and float32 inputs; got {q.dtype}: cast q, k, v to bfloat16 or float16"
        )
    B, S, H, D = q.shape
    if v.shape[-1] != D:
        raise ValueError(f"the Triton kernel needs v with the head dim of q ({D}); got {v.shape[-1]}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Triton kernel supports head dims {SUPPORTED_HEAD_DIMS}; got {D}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got stride {t.stride(-1)}")
    if layout.block_q > 128:
        raise ValueError(f"the Triton kernel supports layout.block_q up to 128; got {layout.block_q}")
    if permute is None:
        permute = DEFAULT_PERMUTE
    if permute not in PERMUTE_MODES:
        raise ValueError(f"permute must be one of {PERMUTE_MODES}, got {permute!r}")
    dev = q.device

    block_m = max(16, triton.next_power_of_2(layout.block_q))
    cfg = dict(default_config(D, block_m, q.dtype))
    if config:
        cfg.update(config)
    unknown = set(cfg) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown kernel config keys {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
    block_n = int(cfg["BLOCK_N"])
    block_d = triton.next_power_of_2(D)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    n_full, n_clean, full_start, n_part, part_start, part_end = _chunk_tables(layout, block_n, dev)
    L, NQ = layout.batch, layout.num_q_blocks
    l_mult = 1 if L > 1 else 0
    q_order, kv_order = layout.q_order_len, layout.kv_order_len
    dummy = n_full  # any int32 tensor for absent pointers
    q_perm = layout.q_perm.to(dev) if layout.q_perm is not None else None
    kv_perm = layout.kv_perm.to(dev) if layout.kv_perm is not None else None
    pad_start, tv_mult, pad_end = _padding(layout, B, dev)
    has_pad = pad_start is not None
    use_tma = bool(cfg.get("TMA", False)) and block_d == D and _tma_ok(k, v, block_n)
    # padded prompts mask every clean chunk through kv_perm, which the TMA reads of the copies skip: no TMA gain there
    permute = resolve_permute(permute, kv_perm is not None, use_tma and not has_pad)
    q_mode = 0 if q_perm is None else (2 if permute == "separate" else 1)
    kv_mode = 0 if kv_perm is None else (1 if permute == "fused" else 2)

    if out is None:
        out = torch.empty(B, S, H, D, dtype=q.dtype, device=dev)
    elif out.shape != (B, S, H, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a ({B}, {S}, {H}, {D}) {q.dtype} tensor with a contiguous last dim")
    if return_lse:
        if lse is None:
            lse = torch.empty(B, H, S, dtype=torch.float32, device=dev)
        elif lse.shape != (B, H, S) or lse.dtype != torch.float32 or lse.stride(-1) != 1:
            raise ValueError(f"lse must be a ({B}, {H}, {S}) float32 tensor with a contiguous last dim")
    lse_t = lse if return_lse else out  # never touched without RETURN_LSE
    sl = (lse_t.stride(0), lse_t.stride(1)) if return_lse else (0, 0)

    text_a, text_b = layout.text_kv if layout.text_kv is not None else (0, 0)
    dense_a, dense_b = layout.dense_q if layout.dense_q is not None else (0, 0)
    has_dense = layout.dense_q is not None
    n_dense_progs = triton.cdiv(dense_b - dense_a, block_m) if has_dense else 0

    def permuted_copy(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        n = perm.shape[-1]
        dst = torch.empty(B, H, n, D, dtype=x.dtype, device=dev)
        grid = (triton.cdiv(n, 64), B * H)
        _permute_rows[grid](
            x, dst, perm, dummy, dummy,
            *_strides3(x), dst.stride(0), dst.stride(2), dst.stride(1),
            0, 0, 0, 0,
            n, H, l_mult, 0, 0,
            SCATTER=False, HAS_DENSE=False, WITH_LSE=False, BLOCK_R=64, BLOCK_D=block_d, HEAD_DIM=D,
        )
        return dst

    qb_t, kb_t, vb_t, ob_t, lb_t = q, k, v, out, lse_t
    sqb, skb, svb, sob, slb = _strides3(q), _strides3(k), _strides3(v), _strides3(out), sl
    if q_mode == 2:
        qb_t = permuted_copy(q, q_perm)
        sqb = (qb_t.stride(0), qb_t.stride(2), qb_t.stride(1))
        ob_t = torch.empty(B, H, q_order, D, dtype=q.dtype, device=dev)
        sob = (ob_t.stride(0), ob_t.stride(2), ob_t.stride(1))
        if return_lse:
            lb_t = torch.empty(B, H, q_order, dtype=torch.float32, device=dev)
            slb = (lb_t.stride(0), lb_t.stride(1))
    if kv_mode == 2:
        kb_t, vb_t = permuted_copy(k, kv_perm), permuted_copy(v, kv_perm)
        skb = (kb_t.stride(0), kb_t.stride(2), kb_t.stride(1))
        svb = (vb_t.stride(0), vb_t.stride(2), vb_t.stride(1))

    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(t: torch.Tensor) -> "TensorDescriptor":  # t: (B, S', H, D), any strides with a unit last one
            return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_n, 1, block_d])

        k_desc, v_desc = desc(k), desc(v)
        if kv_mode == 2:  # the (B, H, n, D) copies seen as (B, n, H, D), the order the kernel indexes
            kb_desc, vb_desc = desc(kb_t.transpose(1, 2)), desc(vb_t.transpose(1, 2))
        else:
            kb_desc, vb_desc = k_desc, v_desc
    else:
        k_desc, v_desc, kb_desc, vb_desc = k, v, k, v  # unused
    grid = (n_dense_progs + NQ, B * H)
    _block_sparse_fwd[grid](
        q, k, v, out, lse_t,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *sl,
        qb_t, kb_t, vb_t, ob_t, lb_t,
        *sqb, *skb, *svb, *sob, *slb,
        q_perm if q_perm is not None else dummy,
        kv_perm if kv_perm is not None else dummy,
        n_full, n_clean, full_start, n_part, part_start, part_end,
        S, H, NQ, q_order, kv_order, full_start.shape[-1], part_start.shape[-1], l_mult,
        text_a, text_b, dense_a, dense_b, n_dense_progs, layout.block_q,
        pad_start if has_pad else dummy, tv_mult, pad_end,
        k_desc, v_desc,
        kb_desc, vb_desc,
        scale * _LOG2E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HEAD_DIM=D,
        Q_MODE=q_mode,
        KV_MODE=kv_mode,
        HAS_TEXT=layout.text_kv is not None,
        HAS_DENSE=has_dense,
        HAS_PAD=has_pad,
        RETURN_LSE=bool(return_lse),
        DOT_PREC=dot_prec,
        USE_TMA=use_tma,
        USE_WS=use_tma and kv_mode == 0 and not has_pad and bool(cfg.get("WS", False)),
        USE_PREFETCH=bool(cfg.get("PREFETCH_IDX", False)) and kv_mode == 1,
        num_warps=int(cfg["num_warps"]),
        num_stages=int(cfg["num_stages"]),
    )
    if q_mode == 2:
        grid = (triton.cdiv(q_order, 64), B * H)
        _permute_rows[grid](
            ob_t, out, q_perm, lb_t, lse_t,
            ob_t.stride(0), ob_t.stride(2), ob_t.stride(1), *_strides3(out),
            *(slb if return_lse else (0, 0)), *sl,
            q_order, H, l_mult, dense_a, dense_b,
            SCATTER=True, HAS_DENSE=has_dense, WITH_LSE=bool(return_lse), BLOCK_R=64, BLOCK_D=block_d, HEAD_DIM=D,
        )
    return (out, lse) if return_lse else out
