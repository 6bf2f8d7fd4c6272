"""GPU check and benchmark of the fused block-sparse attention kernel (sparse_dit/kernels/triton_attention.py).

    python benchmarks/kernel.py --out /tmp/kernel_bench            # everything
    python benchmarks/kernel.py --sections correct,bench --shapes wan480p --densities 0.1,0.5

Sections (comma-separated, in this order):
  correct  bf16 and fp16, head dims 64 and 128: random layouts (segments, permutations with padding,
           text keys, dense rows, per-batch layouts, strided views, poisoned outputs) vs the PyTorch
           reference on small shapes, and block masks vs masked SDPA at a medium shape.
  sweep    (BLOCK_N, num_warps, num_stages) configurations on the first shape at 10% and 50% density.
  bench    Wan2.1 shapes x densities x {random, window} block masks (block 128), bf16 D=128: the
           kernel, cuDNN SDPA dense, and compiled FlexAttention with the same block mask.
  perm     permutation overhead at 10% density: identity vs fused gather vs separate permute (and, with
           flash-attn-4, the FA4 engine's gathers around its kernel).
  fa4      FlashAttention-4 engine (sparse_dit/kernels/fa4.py) vs the Triton kernel vs masked SDPA, bf16 and fp16, head dims
           64 and 128, block masks plain / permuted / text+dense rows / per batch (max abs and relative error),
           and FA4 dense vs cuDNN dense. Skipped with a message when flash_attn.cute is not importable.

With flash-attn-4 importable, `bench` also times FA4 dense and the FA4 engine on the same layouts (its one-off
layout conversion timed separately), and reports against the fastest dense (min of cuDNN and FA4 dense); without
it those columns are NaN and a line says why. On Hopper with Triton 3.6, `bench` also times the Gluon engine
(sparse_dit/kernels/gluon_attention.py) on the same layouts. Wan shapes with FA4 (each well under 4 minutes on an H200):

    python benchmarks/kernel.py --sections fa4,bench --shapes wan480p --densities 0.1,0.2,0.3,0.5 --no-flex
    python benchmarks/kernel.py --sections bench,perm --shapes wan720p --densities 0.1,0.2,0.3,0.5 --no-flex

Experimental kernel variants (config flags, see sparse_dit/kernels/triton_attention.py), instead of the sections:

    python benchmarks/kernel.py --variants --out $OUT          # GPU: Wan 480p B=1, densities 0.1 and 0.3
    TRITON_INTERPRET=1 python benchmarks/kernel.py --variants --smoke   # CPU: tiny shapes, launch/syntax only

  For a sliding-tile-like block mask (query blocks = tiles of a 3-D tile grid, each keeping the window of tiles
  around it) in the identity order and behind random per-head q/kv permutations: every variant's output is
  compared with the default path's (max abs diff; a variant that disagrees or fails to compile is reported
  and skipped), then timed; cuDNN dense is timed for reference.

    python benchmarks/kernel.py --static --variant-list default,PREFETCH_IDX,N64   # CPU, no GPU needed

  compiles the variants for sm_90a with the local Triton and prints shared memory, registers, spills and
  ptxas's wgmma-serialisation warnings (install the device's Triton, 3.6, in a venv to match it exactly).

Timings: triton.testing.do_bench medians on random normal inputs (each q/k/v >= 190 MB, far beyond the
50 MB L2, so one input set is not served from cache). Effective TFLOP/s = 4 * B * H * D * (computed
query-key pairs) / time; cuDNN dense is counted with every pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import triton  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_dit.kernels import fa4  # noqa: E402
from sparse_dit.kernels import gluon_attention as gluon  # noqa: E402
from sparse_dit.kernels.reference import reference_attention  # noqa: E402
from sparse_dit.kernels.triton_attention import default_config, triton_block_sparse_attention  # noqa: E402
from sparse_dit.layout import Layout  # noqa: E402

SHAPES = {
    "wan480p": dict(B=2, H=12, S=32760, D=128),  # Wan2.1-1.3B, 480p, 81 frames
    "wan720p": dict(B=1, H=40, S=75600, D=128),  # Wan2.1-14B, 720p, 81 frames
}
BLOCK = 128


_SAVE = [lambda: None]


def save() -> None:
    _SAVE[0]()


def log(*a) -> None:
    print(*a, flush=True)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def bench(fn, rep_ms: int = 200) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


# ----------------------------------------------------------------------------------------------- masks
def random_block_mask(L, H, nb, density, gen, device):
    """Each query block keeps round(density * nb) key blocks, its own included, chosen at random."""
    keep = max(1, round(density * nb))
    scores = torch.rand(L, H, nb, nb, generator=gen, device=device)
    idx = torch.arange(nb, device=device)
    scores[:, :, idx, idx] = 2.0  # the diagonal block always kept
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(L, H, nb, nb, dtype=torch.bool, device=device)
    mask.scatter_(-1, top, True)
    return mask


def window_block_mask(L, H, nb, density, device):
    """A band around the diagonal (sliding-window-like: one long contiguous segment per query block)."""
    half = max(0, round((density * nb - 1) / 2))
    i = torch.arange(nb, device=device)
    # shift the band inward at the edges so that every row keeps the same number of blocks
    width = min(nb, 2 * half + 1)
    lo = (i - half).clamp(0, nb - width)
    mask = (i[None, :] >= lo[:, None]) & (i[None, :] < lo[:, None] + width)
    return mask.expand(L, H, nb, nb).contiguous()


def flex_block_mask(mask: torch.Tensor, S: int):
    from torch.nn.attention.flex_attention import BlockMask

    L, H, nq, nk = mask.shape
    count = mask.sum(-1).to(torch.int32)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    zeros = torch.zeros_like(count)
    return BlockMask.from_kv_blocks(zeros, torch.zeros_like(order), count, order, BLOCK_SIZE=BLOCK, seq_lengths=(S, S))


# ---------------------------------------------------------------------------------------------- correct
def random_layout(S, H, L, bq, gen, device, *, perms=False, text=False, dense=False):
    """Random segments of arbitrary lengths; optional permutations with -1 padding and a text range at the end."""
    T = 77 if text else 0
    text_kv = (S - T, S) if text else None
    video = torch.arange(S - T, dtype=torch.int32)
    q_perm = kv_perm = None
    if perms:
        nq_len = (-(-S // bq) + 1) * bq
        qp = []
        kp = []
        for _ in range(L * H):
            items = torch.cat([torch.arange(S, dtype=torch.int32), torch.full((nq_len - S,), -1, dtype=torch.int32)])
            qp.append(items[torch.randperm(nq_len, generator=gen)])
            body = torch.cat([video, torch.full((13,), -1, dtype=torch.int32)])
            kp.append(body[torch.randperm(body.numel(), generator=gen)])
        q_perm = torch.stack(qp).view(L, H, -1)
        kv_perm = torch.stack(kp).view(L, H, -1)
    q_len = q_perm.shape[-1] if perms else S
    hi = kv_perm.shape[-1] if perms else S - T
    NQ = -(-q_len // bq)
    G = 6
    cuts = torch.rand(L, H, NQ, 2 * G, generator=gen).mul(hi + 1).long().sort(-1).values
    start, end = cuts[..., 0::2], cuts[..., 1::2]
    count = torch.randint(0 if text else 1, G + 1, (L, H, NQ), generator=gen)
    # drop empty segments by moving them past the count: keep non-empty first
    nonempty = end > start
    order = torch.sort((~nonempty).to(torch.int8), dim=-1, stable=True).indices
    start, end = start.gather(-1, order), end.gather(-1, order)
    count = torch.minimum(count, nonempty.sum(-1))
    if not text:
        bad = count == 0
        start[..., 0] = torch.where(bad, 0, start[..., 0])
        end[..., 0] = torch.where(bad, hi, end[..., 0])
        count = torch.where(bad, 1, count)
    lay = Layout(S, bq, count, start, end, q_perm=q_perm, kv_perm=kv_perm, text_kv=text_kv, dense_q=text_kv if dense else None)
    return lay.validate().to(device)


def section_correct(args, results):
    dev = "cuda"
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    rows = []
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        tol = 1.5e-2 if dtype == torch.bfloat16 else 3e-3
        for D in (64, 128):
            for case in ("plain", "perms", "text_dense", "perms_text_dense", "per_batch_strided"):
                B, S, H = 2, 1000, 3
                L = 2 if case == "per_batch_strided" else 1
                lay = random_layout(
                    S, H, L, 128 if D == 128 else 64, gen, dev,
                    perms="perms" in case, text="text" in case, dense="dense" in case,
                )
                if case == "per_batch_strided":
                    qkv = torch.randn(B, S, 3, H, D, device=dev, dtype=dtype)
                    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
                else:
                    q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(3))
                ref, ref_lse = reference_attention(q, k, v, lay, return_lse=True)
                for permute in ("fused", "separate", "kv_copy"):
                    out = torch.full((B, S, H, D), float("nan"), device=dev, dtype=dtype)
                    lse = torch.full((B, H, S), float("nan"), device=dev)
                    triton_block_sparse_attention(q, k, v, lay, return_lse=True, permute=permute, out=out, lse=lse)
                    torch.cuda.synchronize()
                    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
                    e = rel_err(out, ref)
                    le = float((lse - ref_lse).abs().max())
                    ok = finite and e < tol and le < 1e-2
                    worst = max(worst, e)
                    rows.append(dict(dtype=str(dtype), D=D, case=case, permute=permute, rel_err=e, lse_err=le, finite=finite, ok=ok))
                    log(f"correct {dtype} D={D} {case:18s} {permute:8s} rel_err={e:.2e} lse_err={le:.2e} finite={finite} {'OK' if ok else 'FAIL'}")
        # medium shape vs masked SDPA
        B, S, H, D = 1, 8192, 4, 128
        g2 = torch.Generator(device=dev).manual_seed(args.seed)
        mask = random_block_mask(1, H, S // BLOCK, 0.2, g2, dev)
        lay = Layout.from_block_mask(mask, BLOCK, S)
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(3))
        out = triton_block_sparse_attention(q, k, v, lay)
        dm = lay.to_dense_mask()
        sd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dm).transpose(1, 2)
        e = rel_err(out, sd)
        ok = e < tol and bool(torch.isfinite(out).all())
        rows.append(dict(dtype=str(dtype), D=D, case="medium_vs_sdpa_mask", permute="-", rel_err=e, ok=ok))
        log(f"correct {dtype} S={S} vs masked SDPA rel_err={e:.2e} {'OK' if ok else 'FAIL'}")
    results["correct"] = rows
    n_bad = sum(not r["ok"] for r in rows)
    log(f"correctness: {len(rows) - n_bad}/{len(rows)} OK, worst rel_err {worst:.2e}")


# ------------------------------------------------------------------------------------------------ bench
def make_inputs(shape, dtype=torch.bfloat16):
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    return [torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(3)]


def pairs_of(layout: Layout, B: int) -> float:
    dens = layout.density_per_head().double()  # (L, H)
    S = layout.seq_len
    per_b = dens.sum(-1) * S * S
    return float(per_b.sum() * (B if layout.batch == 1 else 1))


BEST_CONFIG: dict = {}


def run_kernel(q, k, v, lay, **kw):
    return triton_block_sparse_attention(q, k, v, lay, config=BEST_CONFIG or None, **kw)


def section_sweep(args, results):
    name = args.shapes.split(",")[0]
    shape = SHAPES[name]
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    q, k, v = make_inputs(shape)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    nb = -(-S // BLOCK)
    rows = []
    configs = [dict(c) for c in json.loads(args.sweep_configs)]
    for density in (0.1, 0.5):
        lay = Layout.from_block_mask(random_block_mask(1, H, nb, density, gen, "cuda"), BLOCK, S)
        pairs = pairs_of(lay, B)
        ref = triton_block_sparse_attention(q, k, v, lay, config={"BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "TMA": False})
        for cfg in configs:
            err = float("nan")
            try:
                ms = bench(lambda: triton_block_sparse_attention(q, k, v, lay, config=cfg), 150)
                tf = 4 * D * pairs / ms / 1e9
                err = rel_err(triton_block_sparse_attention(q, k, v, lay, config=cfg), ref)
                if not err < 1e-2:
                    log(f"sweep {cfg} WRONG: rel_err {err:.2e} vs the plain config; dropped")
                    tf = float("nan")
            except Exception as exc:  # out of shared memory etc.
                ms, tf = float("nan"), float("nan")
                log(f"sweep {cfg} failed: {type(exc).__name__}: {str(exc)[:300]}")
            rows.append(dict(shape=name, density=density, cfg=json.dumps(cfg, sort_keys=True), ms=ms, tflops=tf, rel_err=err))
            log(f"sweep {name} d={density:.2f} {cfg} {ms:.3f} ms {tf:.0f} TFLOP/s (rel diff {err:.1e})")
    results["sweep"] = rows
    ok = [r for r in rows if r["tflops"] == r["tflops"]]
    for density in (0.1, 0.5):
        best = max((r for r in ok if r["density"] == density), key=lambda r: r["tflops"])
        log(f"best at d={density}: {best}")
    if args.use_best and ok:
        # the config with the best mean rate over both densities becomes the one `bench` and `perm` use
        score = {}
        for r in ok:
            score.setdefault(r["cfg"], []).append(r["tflops"])
        best_key = max((k for k in score if len(score[k]) == 2), key=lambda k: sum(score[k]))
        BEST_CONFIG.update(json.loads(best_key))
        log(f"bench/perm will use {BEST_CONFIG}")
    results["best_config"] = dict(BEST_CONFIG)


def fa4_missing() -> str | None:
    """Why the FA4 columns are skipped, or None when flash-attn-4 runs here."""
    if not fa4.fa4_available():
        return "flash_attn.cute is not importable (pip install 'sparse-dit[fa4]'; on the device: benchmarks/device/fa4_setup.sh)"
    if fa4.fa4_query_granule(torch.empty(1, device="cuda")) != BLOCK:
        return f"FA4's block-sparse forward needs query blocks of {fa4.fa4_query_granule(torch.empty(1, device='cuda'))} on this GPU"
    return None


def section_fa4(args, results):
    """FA4 engine vs Triton vs masked SDPA on the GPU (the issue's correctness record)."""
    why = fa4_missing()
    if why:
        log(f"fa4: skipped: {why}")
        results["fa4_correct"] = dict(skipped=why)
        return
    dev = "cuda"
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for dtype in [dtypes[d] for d in args.fa4_dtypes.split(",")]:
        tol = 1.5e-2 if dtype == torch.bfloat16 else 3e-3
        for D in [int(d) for d in args.fa4_dims.split(",")]:
            for case in ("plain", "perms", "text_dense", "per_batch"):
                B, S, H = 2, 4000, 4
                L = 2 if case == "per_batch" else 1
                nb = -(-S // BLOCK)
                mask = torch.rand(L, H, nb, nb, generator=gen) < 0.2
                mask[:, :, torch.arange(nb), torch.arange(nb)] = True
                kw = dict(text_kv=(3968, S), dense_q=(3968, S)) if case == "text_dense" else {}
                lay = Layout.from_block_mask(mask, BLOCK, S, **kw)
                if case == "perms":
                    q_perm = torch.stack([torch.randperm(S, generator=gen) for _ in range(H)])[None]
                    q_perm = torch.nn.functional.pad(q_perm, (0, nb * BLOCK - S), value=-1)
                    kv_perm = torch.stack([torch.randperm(S, generator=gen) for _ in range(H)])[None]
                    lay = Layout(S, BLOCK, lay.kv_count, lay.kv_start, lay.kv_end, q_perm=q_perm, kv_perm=kv_perm)
                lay = lay.to(dev)
                q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(3))
                row = dict(dtype=str(dtype), D=D, case=case)
                try:
                    out, lse = fa4.fa4_block_sparse_attention(q, k, v, lay, return_lse=True)
                    tri, tri_lse = triton_block_sparse_attention(q, k, v, lay, return_lse=True)
                    dm = lay.to_dense_mask()
                    sd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dm).transpose(1, 2)
                    torch.cuda.synchronize()
                    row.update(
                        max_abs_vs_triton=float((out.float() - tri.float()).abs().max()), rel_vs_triton=rel_err(out, tri),
                        max_abs_vs_sdpa=float((out.float() - sd.float()).abs().max()), rel_vs_sdpa=rel_err(out, sd),
                        triton_rel_vs_sdpa=rel_err(tri, sd), lse_vs_triton=float((lse - tri_lse).abs().max()),
                        finite=bool(torch.isfinite(out).all()),
                    )
                    row["ok"] = row["finite"] and row["rel_vs_sdpa"] < tol and row["rel_vs_triton"] < tol and row["lse_vs_triton"] < 1e-2
                    log(
                        f"fa4 {dtype} D={D} {case:10s} vs triton max {row['max_abs_vs_triton']:.2e} rel {row['rel_vs_triton']:.2e} | "
                        f"vs masked SDPA max {row['max_abs_vs_sdpa']:.2e} rel {row['rel_vs_sdpa']:.2e} (triton {row['triton_rel_vs_sdpa']:.2e}) "
                        f"lse {row['lse_vs_triton']:.1e} {'OK' if row['ok'] else 'FAIL'}"
                    )
                except Exception as exc:
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    log(f"fa4 {dtype} D={D} {case}: FAILED {row['error']}")
                rows.append(row)
            # dense: FA4 vs cuDNN SDPA
            q, k, v = (torch.randn(2, 4000, 4, D, device=dev, dtype=dtype) for _ in range(3))
            out = fa4.fa4_dense_attention(q, k, v)
            sd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
            e = rel_err(out, sd)
            rows.append(dict(dtype=str(dtype), D=D, case="dense_vs_sdpa", rel_vs_sdpa=e, max_abs_vs_sdpa=float((out.float() - sd.float()).abs().max()), ok=e < tol))
            log(f"fa4 {dtype} D={D} dense vs SDPA rel {e:.2e} {'OK' if e < tol else 'FAIL'}")
    results["fa4_correct"] = rows
    n_bad = sum(not r["ok"] for r in rows)
    log(f"fa4 correctness: {len(rows) - n_bad}/{len(rows)} OK")


def section_bench(args, results):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    no_fa4 = fa4_missing()
    if no_fa4:
        log(f"FA4 columns skipped: {no_fa4}")
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
        q, k, v = make_inputs(shape)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        nb = -(-S // BLOCK)
        rep = 200 if S < 50000 else 600
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_cudnn = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), rep)
        except Exception as exc:
            log(f"cuDNN failed on strided views ({exc}); retrying contiguous (B, H, S, D)")
            qc, kc, vc = (x.contiguous() for x in (qt, kt, vt))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_cudnn = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc), rep)
        dense_tf = 4 * B * H * D * S * S / t_cudnn / 1e9
        log(f"{name}: cuDNN dense {t_cudnn:.3f} ms = {dense_tf:.0f} TFLOP/s")
        results.setdefault("cudnn", {})[name] = dict(ms=t_cudnn, tflops=dense_tf)
        t_fa4_dense = float("nan")
        if not no_fa4:
            try:
                fa4.fa4_dense_attention(q, k, v)  # compile
                t_fa4_dense = bench(lambda: fa4.fa4_dense_attention(q, k, v), rep)
                log(f"{name}: FA4 dense {t_fa4_dense:.3f} ms = {4 * B * H * D * S * S / t_fa4_dense / 1e9:.0f} TFLOP/s")
            except Exception as exc:
                log(f"FA4 dense failed: {type(exc).__name__}: {str(exc)[:300]}")
        results.setdefault("fa4_dense", {})[name] = dict(ms=t_fa4_dense, tflops=4 * B * H * D * S * S / t_fa4_dense / 1e9)
        t_fastest = min(t for t in (t_cudnn, t_fa4_dense) if t == t)
        gen = torch.Generator(device="cuda").manual_seed(args.seed)
        densities = [float(x) for x in (args.densities_720p if name == "wan720p" and args.densities_720p else args.densities).split(",")]
        for kind in args.kinds.split(","):
            for density in densities:
                if kind == "random":
                    mask = random_block_mask(1, H, nb, density, gen, "cuda")
                else:
                    mask = window_block_mask(1, H, nb, density, "cuda")
                lay = Layout.from_block_mask(mask, BLOCK, S)
                pairs = pairs_of(lay, B)
                real_density = pairs / (B * H * S * S)
                t_tri = bench(lambda: run_kernel(q, k, v, lay), rep)
                out = run_kernel(q, k, v, lay)
                finite = bool(torch.isfinite(out).all())
                t_flex, err_flex = float("nan"), float("nan")
                if not args.no_flex:
                    try:
                        bm = flex_block_mask(mask.expand(B, H, nb, nb), S)
                        t_flex = bench(lambda: flex(qt, kt, vt, block_mask=bm), rep)
                        # same mask, same function: the two outputs must agree to bf16 rounding
                        err_flex = rel_err(out, flex(qt, kt, vt, block_mask=bm).transpose(1, 2))
                    except Exception as exc:
                        log(f"flex failed: {type(exc).__name__}: {str(exc)[:200]}")
                t_fa4, err_fa4, conv_ms = float("nan"), float("nan"), float("nan")
                if not no_fa4:
                    try:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        blocks = fa4.fa4_blocks(lay)  # one-off per layout object (cached on it)
                        torch.cuda.synchronize()
                        conv_ms = (time.perf_counter() - t0) * 1e3
                        if isinstance(blocks, str):
                            raise ValueError(blocks)
                        out_fa4 = fa4.fa4_block_sparse_attention(q, k, v, lay)
                        err_fa4 = rel_err(out_fa4, out)
                        del out_fa4
                        t_fa4 = bench(lambda: fa4.fa4_block_sparse_attention(q, k, v, lay), rep)
                    except Exception as exc:
                        log(f"FA4 sparse failed: {type(exc).__name__}: {str(exc)[:300]}")
                t_gl, err_gl = float("nan"), float("nan")
                if gluon.gluon_available():
                    try:
                        out_gl = gluon.gluon_block_sparse_attention(q, k, v, lay)  # compiles on the first call
                        err_gl = rel_err(out_gl, out)
                        del out_gl
                        t_gl = bench(lambda: gluon.gluon_block_sparse_attention(q, k, v, lay), rep)
                    except Exception as exc:
                        log(f"Gluon sparse failed: {type(exc).__name__}: {str(exc)[:300]}")
                del out
                tf = 4 * D * pairs / t_tri / 1e9
                row = dict(
                    shape=name, kind=kind, density=real_density, target_density=density, ms=t_tri, tflops=tf,
                    flex_ms=t_flex, flex_tflops=4 * D * pairs / t_flex / 1e9, vs_flex=t_flex / t_tri,
                    vs_cudnn=t_cudnn / t_tri, target_vs_cudnn=0.85 / real_density, finite=finite, rel_err_vs_flex=err_flex,
                    fa4_ms=t_fa4, fa4_tflops=4 * D * pairs / t_fa4 / 1e9, triton_vs_fa4=t_fa4 / t_tri, fa4_rel_err_vs_triton=err_fa4,
                    fa4_convert_ms=conv_ms, fa4_dense_ms=t_fa4_dense, fastest_dense_ms=t_fastest,
                    triton_vs_fastest_dense=t_fastest / t_tri, fa4_vs_fastest_dense=t_fastest / t_fa4,
                    gluon_ms=t_gl, gluon_tflops=4 * D * pairs / t_gl / 1e9, gluon_vs_triton=t_tri / t_gl, gluon_vs_fa4=t_fa4 / t_gl,
                    gluon_rel_err_vs_triton=err_gl, gluon_vs_fastest_dense=t_fastest / t_gl,
                )
                rows.append(row)
                results["bench"] = rows
                save()
                log(
                    f"{name} {kind:6s} d={real_density:.3f} triton {t_tri:8.3f} ms {tf:4.0f} TF/s | flex {t_flex:8.3f} ms "
                    f"{row['flex_tflops']:4.0f} TF/s | x{row['vs_flex']:.2f} vs flex, x{row['vs_cudnn']:.2f} vs cuDNN "
                    f"(target x{row['target_vs_cudnn']:.2f}) finite={finite} err_vs_flex={err_flex:.1e}"
                )
                if not no_fa4:
                    log(
                        f"{name} {kind:6s} d={real_density:.3f} FA4    {t_fa4:8.3f} ms {row['fa4_tflops']:4.0f} TF/s | triton x{row['triton_vs_fa4']:.2f} "
                        f"vs FA4 | vs fastest dense: triton x{row['triton_vs_fastest_dense']:.2f}, FA4 x{row['fa4_vs_fastest_dense']:.2f} | "
                        f"convert {conv_ms:.1f} ms, err vs triton {err_fa4:.1e}"
                    )
                if t_gl == t_gl:
                    log(
                        f"{name} {kind:6s} d={real_density:.3f} Gluon  {t_gl:8.3f} ms {row['gluon_tflops']:4.0f} TF/s | x{row['gluon_vs_triton']:.2f} "
                        f"vs triton, x{row['gluon_vs_fa4']:.2f} vs FA4, x{row['gluon_vs_fastest_dense']:.2f} vs fastest dense | "
                        f"err vs triton {err_gl:.1e}"
                    )
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    results["bench"] = rows


def section_perm(args, results):
    name = args.shapes.split(",")[0]
    shape = SHAPES[name]
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    q, k, v = make_inputs(shape)
    nb = -(-S // BLOCK)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    mask = random_block_mask(1, H, nb, 0.1, gen, "cuda")
    base = Layout.from_block_mask(mask, BLOCK, S)
    q_perm = torch.stack([torch.randperm(S, device="cuda") for _ in range(H)])[None]
    kv_perm = torch.stack([torch.randperm(S, device="cuda") for _ in range(H)])[None]
    nq_len = nb * BLOCK
    q_perm = torch.nn.functional.pad(q_perm, (0, nq_len - S), value=-1)
    permuted = Layout(S, BLOCK, base.kv_count, base.kv_start, base.kv_end, q_perm=q_perm, kv_perm=kv_perm)
    t_id = bench(lambda: run_kernel(q, k, v, base))
    rows = [dict(shape=name, path="identity", ms=t_id, overhead=0.0)]
    if (BEST_CONFIG or default_config(D, BLOCK, q.dtype)).get("TMA"):  # same load path as the gathers: pointers
        cfg = dict(BEST_CONFIG or default_config(D, BLOCK, q.dtype), TMA=False)
        t = bench(lambda: triton_block_sparse_attention(q, k, v, base, config=cfg))
        rows.append(dict(shape=name, path="identity_noTMA", ms=t, overhead=t / t_id - 1))
    for permute in ("fused", "separate", "kv_copy"):
        t = bench(lambda: run_kernel(q, k, v, permuted, permute=permute))
        rows.append(dict(shape=name, path=permute, ms=t, overhead=t / t_id - 1))
    # the permuted result equals the identity one computed on permuted inputs
    out = run_kernel(q, k, v, permuted, permute="fused")
    out2 = run_kernel(q, k, v, permuted, permute="separate")
    e = max(rel_err(out, out2), rel_err(out, run_kernel(q, k, v, permuted, permute="kv_copy")))
    if not fa4_missing():  # FA4 engine: gathers of q/k/v and of the output around the same kernel
        try:
            fa4.fa4_block_sparse_attention(q, k, v, permuted)
            t_fa4_id = bench(lambda: fa4.fa4_block_sparse_attention(q, k, v, base))
            t_fa4_perm = bench(lambda: fa4.fa4_block_sparse_attention(q, k, v, permuted))
            rows.append(dict(shape=name, path="fa4_identity", ms=t_fa4_id, overhead=t_fa4_id / t_id - 1))
            rows.append(dict(shape=name, path="fa4_gathers", ms=t_fa4_perm, overhead=t_fa4_perm / t_fa4_id - 1))
            log(f"perm: FA4 overheads are vs FA4 identity for fa4_gathers, vs triton identity for fa4_identity")
        except Exception as exc:
            log(f"perm: FA4 failed: {type(exc).__name__}: {str(exc)[:300]}")
    for r in rows:
        log(f"perm {name} d=0.10 {r['path']:14s} {r['ms']:.3f} ms overhead {100 * r['overhead']:+.1f}%")
    log(f"perm fused vs separate and kv_copy: max rel diff {e:.2e}")
    results["perm"] = dict(rows=rows, fused_vs_separate=e)


# --------------------------------------------------------------------------------------------- variants
# name -> (config overrides on top of the default config, layouts it applies to: "id" identity, "perm" permuted)
VARIANTS = {
    "default": ({}, ("id", "perm")),
    "PREFETCH_IDX": ({"PREFETCH_IDX": True}, ("perm",)),  # only the gather path has indices to prefetch
    "N64": ({"BLOCK_N": 64}, ("id", "perm")),
    "W16": ({"num_warps": 16}, ("id",)),  # 4 warpgroups (num_warps must be a power of two: 12 is refused)
}
# in order of interest (--budget-s may cut the tail). Measured on the H100 (benchmarks/results/kernel.md,
# "Variants (2026-11-22)"): PREFETCH_IDX within noise of the default, N64 0.83-0.94x of it.
DEFAULT_VARIANTS = "default,PREFETCH_IDX,N64"


def tile_grid(nb: int) -> tuple[int, int, int]:
    """The most cubic (nt, nh, nw) with nt <= nh <= nw and nt * nh * nw == nb."""
    best = (1, 1, nb)
    for a in range(1, nb + 1):
        for b in range(a, nb + 1):
            if nb % (a * b) == 0 and nb // (a * b) >= b:
                cand = (a, b, nb // (a * b))
                if max(cand) - min(cand) < max(best) - min(best):
                    best = cand
    return best


def tile_block_mask(H: int, nb: int, density: float, device) -> tuple[torch.Tensor, tuple, tuple]:
    """(1, H, nb, nb) sliding-tile-like block mask: block i is tile i of a (nt, nh, nw) grid in raster order; each
    query tile keeps the (wt, wh, ww) window of tiles around it (shifted inward at the borders), the window whose
    size is closest to density * nb. Every row of the window is one run of ww consecutive key blocks."""
    grid = tile_grid(nb)
    windows = [(a, b, c) for a in range(1, grid[0] + 1) for b in range(1, grid[1] + 1) for c in range(1, grid[2] + 1)]
    window = min(windows, key=lambda w: (abs(w[0] * w[1] * w[2] / nb - density), max(w) - min(w)))
    i = torch.arange(nb, device=device)
    coords = (i // (grid[1] * grid[2]), (i // grid[2]) % grid[1], i % grid[2])
    mask = torch.ones(nb, nb, dtype=torch.bool, device=device)
    for c, w, n in zip(coords, window, grid):
        lo = (c - w // 2).clamp(0, n - w)
        mask &= (c[None, :] >= lo[:, None]) & (c[None, :] < lo[:, None] + w)
    return mask.expand(1, H, nb, nb).contiguous(), grid, window


def randomly_permuted(base: Layout, H: int, gen: torch.Generator, device) -> Layout:
    """The same segments behind a random per-head q_perm (padded with -1 to whole blocks) and kv_perm."""
    S, bq = base.seq_len, base.block_q
    nq_len = base.num_q_blocks * bq
    q_perm = torch.stack([torch.randperm(S, generator=gen) for _ in range(H)])[None]
    kv_perm = torch.stack([torch.randperm(S, generator=gen) for _ in range(H)])[None]
    q_perm = torch.nn.functional.pad(q_perm, (0, nq_len - S), value=-1)
    return Layout(S, bq, base.kv_count, base.kv_start, base.kv_end, q_perm=q_perm.to(device), kv_perm=kv_perm.to(device))


def section_variants(args, results):
    """Default kernel vs other configs / experimental flags, on tile-like masks, identity and randomly permuted."""
    smoke = args.smoke
    gpu = torch.cuda.is_available() and not smoke
    dev = "cuda" if gpu else "cpu"
    if smoke:  # tiny, for the CPU interpreter (bf16 dots are wrong there): syntax, launch and agreement only
        B, H, S, D, block, dtype = 1, 2, 190, 32, 16, torch.float16
    else:
        B, H, S, D, block, dtype = 1, 12, 32760, 128, BLOCK, torch.bfloat16
    names = [n.strip() for n in args.variant_list.split(",") if n.strip()]
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}; known: {', '.join(VARIANTS)}")
    if "default" not in names:
        names.insert(0, "default")
    base_cfg = default_config(D, block, dtype)
    log(f"variants: B={B} H={H} S={S} D={D} block={block} {dtype}; default config {base_cfg}; device {dev}")
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(device=dev, dtype=dtype) for _ in range(3))
    nb = -(-S // block)
    rows = []
    t_start = time.time()

    def timed(fn) -> float:
        if gpu:
            return bench(fn, args.rep_ms)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    if gpu:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt))
            tf = 4 * B * H * D * S * S / t / 1e9
            log(f"cuDNN dense {t:.3f} ms = {tf:.0f} TFLOP/s")
            results["variants_cudnn"] = dict(ms=t, tflops=tf)
        except Exception as exc:
            log(f"cuDNN failed: {type(exc).__name__}: {str(exc)[:300]}")

    for density in [float(x) for x in args.variant_densities.split(",")]:
        mask, grid, window = tile_block_mask(H, nb, density, dev)
        ident = Layout.from_block_mask(mask, block, S)
        layouts = {"id": ident, "perm": randomly_permuted(ident, H, gen, dev)}
        real_d = pairs_of(ident, B) / (B * H * S * S)
        log(f"--- tile grid {grid} window {window}: density {real_d:.3f} (target {density})")
        for kind, lay in layouts.items():
            pairs = pairs_of(lay, B)  # the permuted layout's -1 query slots shift a few rows between blocks
            ref = None
            t_ref = None
            for name in names + ["default"]:  # default timed again at the end: the run-to-run spread
                overrides, kinds = VARIANTS[name]
                if kind not in kinds:
                    continue
                again = ref is not None and name == "default"
                if time.time() - t_start > args.budget_s and not again:
                    log(f"{density:.1f} {kind:4s} {name:20s} skipped: past --budget-s {args.budget_s:.0f} s")
                    continue
                label = name + (" (again)" if again else "")
                cfg = dict(base_cfg, **overrides)
                row = dict(density=real_d, target_density=density, layout=kind, variant=label, cfg=json.dumps(cfg, sort_keys=True))
                try:
                    t0 = time.time()
                    out = triton_block_sparse_attention(q, k, v, lay, config=cfg)
                    if gpu:
                        torch.cuda.synchronize()
                    first_s = time.time() - t0
                    finite = bool(torch.isfinite(out).all())
                    if name == "default" and ref is None:
                        ref, diff = out, 0.0
                    elif ref is None:  # the default path failed: nothing to compare with
                        diff = float("nan")
                    else:
                        diff = float((out.float() - ref.float()).abs().max())
                    row.update(first_call_s=first_s, max_abs_diff=diff, finite=finite)
                    del out
                    if not finite or not diff <= args.variant_tol:
                        row.update(ok=False)
                        log(f"{density:.1f} {kind:4s} {label:20s} WRONG: max abs diff vs default {diff:.2e}, finite={finite}; not timed")
                    elif not gpu:  # interpreter timings mean nothing
                        row.update(ok=True)
                        log(f"{density:.1f} {kind:4s} {label:20s} ran (max abs diff vs default {diff:.1e}; {first_s:.1f} s)")
                    else:
                        ms = timed(lambda: triton_block_sparse_attention(q, k, v, lay, config=cfg))
                        tf = 4 * D * pairs / ms / 1e9
                        if name == "default" and not again:
                            t_ref = ms
                        row.update(ok=True, ms=ms, tflops=tf, vs_default=t_ref / ms if t_ref else float("nan"))
                        log(
                            f"{density:.1f} {kind:4s} {label:20s} {ms:8.3f} ms {tf:5.0f} TFLOP/s  x{row['vs_default']:.3f} vs default"
                            f"  (max abs diff {diff:.1e}; first call {first_s:.1f} s)"
                        )
                except Exception as exc:  # compile errors, out of resources, refused options
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
                    log(f"{density:.1f} {kind:4s} {label:20s} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                rows.append(row)
                results["variants"] = rows
                save()
            del ref
    results["variants"] = rows


def section_static(args, results):
    """Compile each variant for sm_90a on this machine (no GPU; TRITON_INTERPRET unset) and report what decides
    whether it can win: shared memory (H100 limit 232448 B), registers and spills (ptxas -v), ptxas performance
    warnings (C7514/C7515: every wgmma of the kernel serialised), and the wgmma count. Same layouts as
    --variants, at S=1000. Matches the device best with the device's Triton (3.6) installed here."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.tensor_descriptor import TensorDescriptor

    import sparse_dit.kernels.triton_attention as ta

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--static compiles for the GPU: run it without TRITON_INTERPRET=1")
    B, H, S, D, block, dtype = 1, 2, 1000, 128, BLOCK, torch.bfloat16
    base_cfg = default_config(D, block, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(dtype) for _ in range(3))
    mask, _, _ = tile_block_mask(H, -(-S // block), 0.3, "cpu")
    ident = Layout.from_block_mask(mask, block, S)
    layouts = {"id": ident, "perm": randomly_permuted(ident, H, gen, "cpu")}
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    tyname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
    kernel = ta._block_sparse_fwd
    captured = {}

    class Capture:  # stands in for the kernel: records the launch arguments
        def __getitem__(self, grid):
            return lambda *a, **kw: captured.update(args=a, kw=kw)

    saved = (ta._block_sparse_fwd, ta._interpreting, ta._tma_ok)
    rows = []
    names = [n.strip() for n in args.variant_list.split(",") if n.strip()]
    try:
        ta._block_sparse_fwd, ta._interpreting, ta._tma_ok = Capture(), (lambda: True), (lambda *a: True)
        for name in names:
            overrides, kinds = VARIANTS[name]
            for kind in kinds:
                cfg = dict(base_cfg, **overrides)
                row = dict(variant=name, layout=kind, cfg=json.dumps(cfg, sort_keys=True))
                try:
                    ta.triton_block_sparse_attention(q, k, v, layouts[kind], config=cfg)
                    sig, consts, attrs, opts = {}, {}, {}, {}
                    for i, (arg_name, a) in enumerate(zip(kernel.arg_names, captured["args"])):
                        if isinstance(a, torch.Tensor):
                            sig[arg_name] = "*" + tyname[a.dtype]
                            attrs[(i,)] = [["tt.divisibility", 16]]
                        elif isinstance(a, TensorDescriptor):
                            sig[arg_name] = f"tensordesc<{tyname[a.base.dtype]}[{','.join(map(str, a.block_shape))}]>"
                        elif isinstance(a, int) and a == 1:  # the launcher specialises 1 as a constant
                            sig[arg_name] = "constexpr"
                            consts[(i,)] = 1
                        elif isinstance(a, int):
                            sig[arg_name] = "i32"
                            if a % 16 == 0:
                                attrs[(i,)] = [["tt.divisibility", 16]]
                        else:
                            sig[arg_name] = "fp32"
                    for key, val in captured["kw"].items():
                        if key in ("num_warps", "num_stages"):
                            opts[key] = val
                        else:
                            sig[key] = "constexpr"
                            consts[(kernel.arg_names.index(key),)] = val
                    for i, param in enumerate(kernel.params):  # constexprs left at their defaults
                        if param.name not in sig:
                            sig[param.name] = "constexpr"
                            consts[(i,)] = param.default
                    sig = {n: sig[n] for n in kernel.arg_names}
                    ck = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
                    ptxas_log = ""
                    with tempfile.TemporaryDirectory() as d:
                        Path(d, "k.ptx").write_text(ck.asm["ptx"])
                        for exe in ("ptxas", "ptxas-blackwell"):
                            if (bindir / exe).exists():
                                r = subprocess.run([str(bindir / exe), "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                                                   capture_output=True, text=True)
                                if r.returncode == 0:
                                    ptxas_log = r.stderr
                                    break
                    regs = re.search(r"Used (\d+) registers", ptxas_log)
                    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
                    row.update(
                        shared=ck.metadata.shared, fits=ck.metadata.shared <= 232448,
                        regs=int(regs.group(1)) if regs else None,
                        spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else None,
                        wgmma_serialised=bool(re.search(r"C751[0-9]", ptxas_log)),
                        wgmma_ops=ck.asm["ttgir"].count("ttng.warp_group_dot "),
                    )
                    log(
                        f"static {name:20s} {kind:4s} shared {row['shared']:6d} B{'' if row['fits'] else ' (OVER the H100 limit)'}"
                        f"  regs {row['regs']}  spills {row['spill_bytes']} B  wgmma {row['wgmma_ops']}"
                        f"{'  ptxas: wgmma SERIALISED' if row['wgmma_serialised'] else ''}"
                    )
                except Exception as exc:
                    row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    log(f"static {name:20s} {kind:4s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[-1][:200] if str(exc) else ''}")
                rows.append(row)
    finally:
        ta._block_sparse_fwd, ta._interpreting, ta._tma_ok = saved
    results["static"] = rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="correct,sweep,bench,perm")
    p.add_argument("--shapes", default="wan480p,wan720p")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,1.0")
    p.add_argument("--densities-720p", default="", help="density list for wan720p (default: --densities)")
    p.add_argument("--kinds", default="random,window")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--fa4-dtypes", default="bf16,fp16", help="section fa4: dtypes (bf16, fp16)")
    p.add_argument("--fa4-dims", default="64,128", help="section fa4: head dims")
    p.add_argument(
        "--sweep-configs",
        default='[{"BLOCK_N":128,"num_warps":8,"num_stages":3,"TMA":true},{"BLOCK_N":128,"num_warps":8,"num_stages":2,"TMA":true},'
        '{"BLOCK_N":128,"num_warps":8,"num_stages":3,"TMA":true,"WS":true},{"BLOCK_N":128,"num_warps":8,"num_stages":2,"TMA":true,"WS":true}]',
        help="JSON list of kernel configs for `sweep`",
    )
    p.add_argument("--use-best", action="store_true", help="bench/perm use the sweep's best config, not the default")
    p.add_argument("--variants", action="store_true", help="run the variant comparison instead of --sections")
    p.add_argument("--variant-list", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--variant-densities", default="0.1,0.3")
    p.add_argument("--variant-tol", type=float, default=1e-2, help="max abs diff vs the default path")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench time per variant (--variants)")
    p.add_argument("--budget-s", type=float, default=150, help="--variants: start no new variant after this many seconds")
    p.add_argument("--smoke", action="store_true", help="--variants on tiny shapes (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--static", action="store_true", help="compile the variants for sm_90a here, no GPU (see section_static)")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    log(f"seed {args.seed}; torch {torch.__version__}, triton {triton.__version__}, {device}")
    log(f"default config D=128 block 128 bf16: {default_config(128, 128, torch.bfloat16)}")
    results = {"args": vars(args), "device": device, "torch": torch.__version__, "triton": triton.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "kernel_static.json" if args.static else "kernel_variants.json" if args.variants else "kernel_bench.json"
    _SAVE[0] = lambda: (out / name).write_text(json.dumps(results, indent=1, default=str))
    if args.static:
        section_static(args, results)
        save()
        return
    if args.variants:
        if args.smoke and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            raise SystemExit("--smoke without a GPU needs TRITON_INTERPRET=1 in the environment")
        t0 = time.time()
        section_variants(args, results)
        log(f"[variants took {time.time() - t0:.0f} s]")
        save()
        return
    for sec in args.sections.split(","):
        t0 = time.time()
        {"correct": section_correct, "sweep": section_sweep, "bench": section_bench, "perm": section_perm, "fa4": section_fa4}[sec](args, results)
        log(f"[{sec} took {time.time() - t0:.0f} s]")
        save()


if __name__ == "__main__":
    main()
