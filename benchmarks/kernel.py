"""GPU check and benchmark of the fused block-sparse attention kernel (kernels/triton_attention.py).

    python benchmarks/kernel.py --out /tmp/kernel_bench            # everything
    python benchmarks/kernel.py --sections correct,bench --shapes wan480p --densities 0.1,0.5

Sections (comma-separated, in this order):
  correct  bf16 and fp16, head dims 64 and 128: random layouts (segments, permutations with padding,
           text keys, dense rows, per-batch layouts, strided views, poisoned outputs) vs the PyTorch
           reference on small shapes, and block masks vs masked SDPA at a medium shape.
  sweep    (BLOCK_N, num_warps, num_stages) configurations on the first shape at 10% and 50% density.
  bench    Wan2.1 shapes x densities x {random, window} block masks (block 128), bf16 D=128: the
           kernel, cuDNN SDPA dense, and compiled FlexAttention with the same block mask.
  perm     permutation overhead at 10% density: identity vs fused gather vs separate permute.

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
                for permute in ("fused", "separate"):
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


def section_bench(args, results):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
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
                del out
                tf = 4 * D * pairs / t_tri / 1e9
                row = dict(
                    shape=name, kind=kind, density=real_density, target_density=density, ms=t_tri, tflops=tf,
                    flex_ms=t_flex, flex_tflops=4 * D * pairs / t_flex / 1e9, vs_flex=t_flex / t_tri,
                    vs_cudnn=t_cudnn / t_tri, target_vs_cudnn=0.85 / real_density, finite=finite, rel_err_vs_flex=err_flex,
                )
                rows.append(row)
                results["bench"] = rows
                save()
                log(
                    f"{name} {kind:6s} d={real_density:.3f} triton {t_tri:8.3f} ms {tf:4.0f} TF/s | flex {t_flex:8.3f} ms "
                    f"{row['flex_tflops']:4.0f} TF/s | x{row['vs_flex']:.2f} vs flex, x{row['vs_cudnn']:.2f} vs cuDNN "
                    f"(target x{row['target_vs_cudnn']:.2f}) finite={finite} err_vs_flex={err_flex:.1e}"
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
    for permute in ("fused", "separate"):
        t = bench(lambda: run_kernel(q, k, v, permuted, permute=permute))
        rows.append(dict(shape=name, path=permute, ms=t, overhead=t / t_id - 1))
    # the permuted result equals the identity one computed on permuted inputs
    out = run_kernel(q, k, v, permuted, permute="fused")
    out2 = run_kernel(q, k, v, permuted, permute="separate")
    e = rel_err(out, out2)
    for r in rows:
        log(f"perm {name} d=0.10 {r['path']:14s} {r['ms']:.3f} ms overhead {100 * r['overhead']:+.1f}%")
    log(f"perm fused vs separate rel diff {e:.2e}")
    results["perm"] = dict(rows=rows, fused_vs_separate=e)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="correct,sweep,bench,perm")
    p.add_argument("--shapes", default="wan480p,wan720p")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,1.0")
    p.add_argument("--densities-720p", default="", help="density list for wan720p (default: --densities)")
    p.add_argument("--kinds", default="random,window")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument(
        "--sweep-configs",
        default='[{"BLOCK_N":128,"num_warps":8,"num_stages":3,"TMA":true},{"BLOCK_N":128,"num_warps":8,"num_stages":2,"TMA":true},'
        '{"BLOCK_N":128,"num_warps":8,"num_stages":3,"TMA":true,"WS":true},{"BLOCK_N":128,"num_warps":8,"num_stages":2,"TMA":true,"WS":true}]',
        help="JSON list of kernel configs for `sweep`",
    )
    p.add_argument("--use-best", action="store_true", help="bench/perm use the sweep's best config, not the default")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    log(f"seed {args.seed}; torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    log(f"default config D=128 block 128 bf16: {default_config(128, 128, torch.bfloat16)}")
    results = {"args": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _SAVE[0] = lambda: (out / "kernel_bench.json").write_text(json.dumps(results, indent=1, default=str))
    for sec in args.sections.split(","):
        t0 = time.time()
        {"correct": section_correct, "sweep": section_sweep, "bench": section_bench, "perm": section_perm}[sec](args, results)
        log(f"[{sec} took {time.time() - t0:.0f} s]")
        save()


if __name__ == "__main__":
    main()
