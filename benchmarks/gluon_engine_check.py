#!/usr/bin/env python3
"""GPU check and benchmark of the Gluon engine (sparse_dit/kernels/gluon_attention.py), H100/H200.

    python3 benchmarks/gluon_engine_check.py --out $OUT/ge          # GPU: correctness + speed, < 80 s on an H200
    /tmp/gluon_venv/bin/python benchmarks/gluon_engine_check.py --compile-only   # no GPU, no torch needed

1. correctness: random block-mask layouts (`Layout.from_block_mask(mask, 128, S)`) with ragged S, B 1/2, H 2/5,
   tables shared (L = 1) or per batch (L = B), query blocks with no kept block, return_lse both ways, bf16 and fp16,
   outputs poisoned with NaN (and a NaN guard zone after the output, which must stay NaN), against
   `reference_attention` and (bf16) `triton_block_sparse_attention`. One line per case: max rel error, OK/FAIL.
2. speed at Wan 480p (B=2 H=12 S=32760 D=128 bf16), random and window block masks at densities 0.1/0.3/0.5:
   ms and effective TFLOP/s (4 B H D * kept query-key pairs / t) of the Gluon engine and the Triton kernel, and
   cuDNN dense SDPA (every pair counted).

JSON (written after every case) to ``--out`` (a directory, file gluon_engine_check.json; or a path ending .json).
Every case runs under try/except and a watchdog: a hang writes the JSON so far and exits 124.

``--compile-only``: compiles the library kernel for sm_90a (GPUTarget("cuda", 90, 64)) with the local Triton
(use the device's Triton 3.6, e.g. /tmp/gluon_venv, which has no torch: torch and sparse_dit's torch modules are
then stubbed just to define the kernel) and prints ptxas spills/registers, wgmma serialisation warnings and the
SASS evidence of the softmax under the PV wgmma (MUFU.EX2 between WARPGROUP.DEPBAR.LE 0x1 and the next DEPBAR).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import threading
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = "cuda"  # "cpu" only for --dry-run-cpu (the script's own logic around a torch stand-in for the kernel)


def _sync():
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ imports
def _load_engine_without_torch():
    """Define the library kernel in an environment without torch (compile-only): stub torch and the sparse_dit
    modules the library imports, then execute the library file as sparse_dit.kernels.gluon_attention."""
    t = types.ModuleType("torch")

    class _DType:
        def __init__(self, name):
            self.name = name

        def __repr__(self):
            return f"torch.{self.name}"

    t.float16, t.bfloat16, t.float32 = _DType("float16"), _DType("bfloat16"), _DType("float32")
    t.Tensor = object
    sys.modules["torch"] = t
    for name in ("sparse_dit", "sparse_dit.kernels"):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    lay = types.ModuleType("sparse_dit.layout")
    lay.Layout = object
    sys.modules["sparse_dit.layout"] = lay
    fa4 = types.ModuleType("sparse_dit.kernels.fa4")
    fa4.BLOCK_KV, fa4.Fa4Blocks, fa4.fa4_blocks, fa4.gather_rows = 128, object, None, None
    sys.modules["sparse_dit.kernels.fa4"] = fa4
    ref = types.ModuleType("sparse_dit.kernels.reference")
    ref.check_qkv = None
    sys.modules["sparse_dit.kernels.reference"] = ref
    name = "sparse_dit.kernels.gluon_attention"
    spec = importlib.util.spec_from_file_location(name, REPO / "sparse_dit" / "kernels" / "gluon_attention.py")
    m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    spec.loader.exec_module(m)
    return m


def load_engine():
    try:
        import torch  # noqa: F401
    except ImportError:
        return _load_engine_without_torch()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _setup import ensure_sparse_dit

    ensure_sparse_dit()
    import sparse_dit.kernels.gluon_attention as m

    return m


# ------------------------------------------------------------------------------------------- compile-only
def _nvidia_bin(name):
    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if env:
        return env
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def _ptxas_check(ptx):
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([_nvidia_bin("ptxas"), "-v", "--gpu-name=sm_90a", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    serial = [ln for ln in out.splitlines() if "wgmma" in ln.lower() or "serializ" in ln.lower()]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out)]
    print(f"  ptxas -v rc={r.returncode}: registers {regs}, spill bytes {spills}")
    for ln in out.splitlines():
        if "Compile time" not in ln and "gmem" not in ln:
            print("    " + ln.strip())
    print(f"  ptxas wgmma serialisation warnings : {'NONE' if not serial else serial}")
    return dict(rc=r.returncode, output=out, serialisation_warnings=serial, spill_bytes=spills, registers=regs)


def _sass_check(cubin):
    import subprocess
    import tempfile

    if not cubin:
        return None
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        r = subprocess.run([_nvidia_bin("nvdisasm"), "-c", p], capture_output=True, text=True)
    sass = r.stdout
    n_hgmma = len(re.findall(r"\bHGMMA\.", sass))
    depbar = re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", sass)
    lines = sass.splitlines()
    under = []
    for i, ln in enumerate(lines):
        if re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x1\b", ln):
            n = 0
            for ln2 in lines[i + 1:]:
                if "WARPGROUP.DEPBAR" in ln2:
                    break
                n += "MUFU.EX2" in ln2
            under.append(n)
    print(f"  SASS: HGMMA={n_hgmma} WARPGROUP.DEPBAR.LE thresholds={depbar}")
    print(f"  SASS: MUFU.EX2 between DEPBAR.LE 0x1 and the next DEPBAR (softmax under the PV wgmma): {under}")
    return dict(n_hgmma=n_hgmma, depbar=depbar, ex2_under_pv=under)


def compile_only(args):
    eng = load_engine()
    if eng.gluon_import_error():
        print(f"[compile-only] Gluon not importable: {eng.gluon_import_error()}")
        return 1
    import triton

    print(f"[compile-only] triton {triton.__version__}, target sm_90a (GPUTarget('cuda', 90, 64))")
    infos, rc = [], 0
    configs = [("bf16", True, True), ("bf16", False, False), ("fp16", True, False), ("fp16", False, True)]
    for dt, tail, lse in configs:
        tag = f"{dt} HAS_TAIL={tail} RETURN_LSE={lse}"
        try:
            t0 = time.time()
            ck = eng.compile_for_sm90(dt, tail, lse)
            ptx = ck.asm["ptx"]
            waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
            reqntid = re.findall(r"\.reqntid\s+(\d+)", ptx)
            n_mma = len(re.findall(r"wgmma\.mma_async", ptx))
            n_maxnreg = len(re.findall(r"setmaxnreg", ptx))
            print(f"[compile-only] {tag}: compiled in {time.time() - t0:.1f}s, shared {ck.metadata.shared} B, "
                  f".reqntid {reqntid}, wgmma.mma_async {n_mma}, wait_group {waits}, setmaxnreg {n_maxnreg}")
            info = dict(config=tag, shared=ck.metadata.shared, waits=waits,
                        partition_bar_sync=len(re.findall(r"\bbar\.sync\s+\d+,\s*128;", ptx)),
                        mbarrier_try_wait=len(re.findall(r"mbarrier\.try_wait", ptx)))
            print(f"  PTX sites: partition bar.sync {info['partition_bar_sync']}, "
                  f"mbarrier.try_wait {info['mbarrier_try_wait']}")
            info["ptxas"] = _ptxas_check(ptx)
            info["sass"] = _sass_check(ck.asm.get("cubin"))
            p, s = info["ptxas"], info["sass"] or {}
            ok = (p["rc"] == 0 and not any(p["spill_bytes"]) and not p["serialisation_warnings"]
                  and s.get("ex2_under_pv") and all(n >= 64 for n in s["ex2_under_pv"]))
            info["ok"] = bool(ok)
            print(f"[compile-only] {tag}: {'OK' if ok else 'CHECK'} (0 spills, no serialisation, >= 64 EX2 under PV)")
            if not ok:
                rc = 1
            if args.out and args.dump_ir:
                d = _outdir(args)
                for ext in ("ttgir", "ptx"):
                    with open(os.path.join(d, f"gluon_engine_{dt}_t{int(tail)}_l{int(lse)}.{ext}"), "w") as f:
                        f.write(ck.asm[ext])
        except Exception as e:
            traceback.print_exc()
            info = dict(config=tag, error=repr(e), ok=False)
            rc = 1
        infos.append(info)
    if args.out:
        with open(os.path.join(_outdir(args), "gluon_engine_compile.json"), "w") as f:
            json.dump(infos, f, indent=1, default=str)
    return rc


# ------------------------------------------------------------------------------------------- GPU helpers
def _outdir(args):
    d = os.path.dirname(args.out) if args.out.endswith(".json") else args.out
    os.makedirs(d or ".", exist_ok=True)
    return d or "."


def _dump(results, args):
    if not args.out:
        return None
    path = args.out if args.out.endswith(".json") else os.path.join(_outdir(args), "gluon_engine_check.json")
    _outdir(args)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return path


class Watchdog:
    """A GPU hang (an mbarrier phase error) cannot be interrupted from Python: if a case is not disarmed within
    ``timeout`` s, the JSON so far is written and the process exits 124."""

    def __init__(self, args, results):
        self.args, self.results, self.timer = args, results, None

    def arm(self, name, timeout=None):
        self.disarm()
        timeout = timeout or self.args.case_timeout

        def fire():
            print(f"WATCHDOG: case '{name}' exceeded {timeout:.0f}s -- probable hang; exiting 124", flush=True)
            self.results.setdefault("hang", []).append(name)
            try:
                _dump(self.results, self.args)
            finally:
                os._exit(124)

        self.timer = threading.Timer(timeout, fire)
        self.timer.daemon = True
        self.timer.start()

    def disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def random_block_mask(L, H, nb, density, gen, device):
    """Each query block keeps round(density * nb) random key blocks (its own included)."""
    import torch

    keep = max(1, round(density * nb))
    scores = torch.rand(L, H, nb, nb, generator=gen, device=device)
    i = torch.arange(nb, device=device)
    scores[:, :, i, i] = 2.0
    mask = torch.zeros(L, H, nb, nb, dtype=torch.bool, device=device)
    mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return mask


def emptied(layout, n, gen):
    """``layout`` with ``n`` random query blocks per (l, h) keeping no key (built without `Layout.validate`, which
    refuses them; the engine must give zeros and lse -inf there, as for padding query blocks). Returns the layout
    and the (L, H, NQ) bool of emptied blocks."""
    import torch

    from sparse_dit.layout import Layout

    L, H, NQ = layout.kv_count.shape
    empty = torch.zeros(L, H, NQ, dtype=torch.bool, device=layout.kv_count.device)
    if n:
        rows = torch.rand(L, H, NQ, generator=gen, device=empty.device).topk(min(n, NQ), dim=-1).indices
        empty.scatter_(-1, rows, True)
    count = layout.kv_count.masked_fill(empty, 0)
    return Layout(layout.seq_len, layout.block_q, count, layout.kv_start, layout.kv_end), empty


def permuted(layout, gen):
    """``layout``'s segments behind random per-head q/kv permutations (query order padded with -1 to whole blocks)."""
    import torch
    import torch.nn.functional as F

    from sparse_dit.layout import Layout

    L, H, NQ = layout.kv_count.shape
    S, dev = layout.seq_len, layout.kv_count.device
    qp = torch.rand(L, H, S, generator=gen, device=dev).argsort(-1)
    qp = F.pad(qp, (0, NQ * layout.block_q - S), value=-1)
    kp = torch.rand(L, H, S, generator=gen, device=dev).argsort(-1)
    return Layout(S, layout.block_q, layout.kv_count, layout.kv_start, layout.kv_end, q_perm=qp, kv_perm=kp)


def window_block_mask(L, H, nb, density, device):
    import torch

    half = max(0, round((density * nb - 1) / 2))
    width = min(nb, 2 * half + 1)
    i = torch.arange(nb, device=device)
    lo = (i - half).clamp(0, nb - width)
    mask = (i[None, :] >= lo[:, None]) & (i[None, :] < lo[:, None] + width)
    return mask.expand(L, H, nb, nb).contiguous()


def kept_pairs(mask, S, B, block=128):
    """Query-key pairs a block mask (L, H, nb, nb) keeps, summed over heads and the batch (ragged last block
    counted exactly)."""
    import torch

    nb = mask.shape[-1]
    sizes = torch.full((nb,), block, dtype=torch.float64, device=mask.device)
    sizes[-1] = S - block * (nb - 1)
    pairs = torch.einsum("lhqk,q,k->", mask.double(), sizes, sizes).item()
    return pairs * (B if mask.shape[0] == 1 else 1)


def compare(out, ref, lse=None, ref_lse=None):
    """Max relative error of out (to max |ref|) and, with lse, max abs lse error over finite entries plus whether
    the -inf entries coincide."""
    o, r = out.float(), ref.float()
    err = (o - r).abs().max().item()
    scale = max(r.abs().max().item(), 1e-6)
    res = dict(max_abs=err, rel=err / scale, finite=bool(o.isfinite().all()))
    if lse is not None:
        fin = ref_lse.isfinite()
        res["lse_inf_match"] = bool(((lse == float("-inf")) == ~fin).all())
        res["lse_max_abs"] = (lse[fin] - ref_lse[fin].float()).abs().max().item() if fin.any() else 0.0
    return res


# ------------------------------------------------------------------------------------------- correctness
CASES = [
    # S, B, H, L, dtype, return_lse, empty query blocks per (l, h), density, permuted, also vs the Triton kernel
    # (Triton comparisons cost a compile each: two here, the bench compares every layout too)
    (1000, 1, 2, 1, "bf16", True, 1, 0.5, False, False),
    (4096 + 77, 2, 5, 2, "bf16", True, 3, 0.3, False, True),
    (4000, 2, 2, 1, "fp16", False, 2, 0.5, False, False),
    (4096, 2, 2, 2, "bf16", False, 0, 0.4, False, False),
    (1000, 2, 5, 2, "fp16", True, 2, 0.7, False, False),
    (4000, 1, 5, 1, "bf16", False, 0, 1.0, False, True),
    (1000, 2, 2, 1, "bf16", True, 0, 0.4, True, False),
]


def check(args, eng, results, wd, deadline):
    import torch

    from sparse_dit.kernels.reference import reference_attention
    from sparse_dit.kernels.triton_attention import triton_block_sparse_attention
    from sparse_dit.layout import Layout

    for S, B, H, L, dt, want_lse, empty, density, perm, vs_triton in CASES:
        name = (f"S={S} B={B} H={H} L={L} {dt} lse={want_lse} empty_qblocks={empty} density={density}"
                + (" permuted" if perm else ""))
        if time.time() > deadline:
            print(f"[check] {name}: SKIPPED (time budget)", flush=True)
            results["correctness"].append(dict(case=name, skipped="time budget"))
            continue
        case = dict(case=name)
        wd.arm(f"check {name}", args.case_timeout + (20 if vs_triton else 0))  # + a Triton kernel compile
        try:
            dtype = torch.bfloat16 if dt == "bf16" else torch.float16
            gen = torch.Generator(device=DEV).manual_seed(S * 7 + B * 3 + H)
            q, k, v = (torch.randn(B, S, H, 128, device=DEV, dtype=dtype, generator=gen) for _ in range(3))
            nb = -(-S // 128)
            mask = random_block_mask(L, H, nb, density, gen, DEV)
            layout, empty_q = emptied(Layout.from_block_mask(mask, 128, S), empty, gen)
            if perm:
                layout = permuted(layout, gen)
            sup = eng.gluon_sparse_supported(q, layout)
            assert sup is True, f"gluon_sparse_supported: {sup}"
            n = B * S * H * 128
            big = torch.full((n + 4 * H * 128 * 64,), float("nan"), device=DEV, dtype=dtype)  # NaN guard after out
            out = big[:n].view(B, S, H, 128)
            lse = torch.full((B, H, S), float("nan"), device=DEV, dtype=torch.float32) if want_lse else None
            t0 = time.time()
            with torch.no_grad():
                res = eng.gluon_block_sparse_attention(q, k, v, layout, return_lse=want_lse, out=out, lse=lse,
                                                       persistent=not args.per_tile)
                _sync()
                t_first = time.time() - t0
                o_g, l_g = (res if want_lse else (res, None))
                ref = reference_attention(q, k, v, layout, return_lse=want_lse)
                o_r, l_r = (ref if want_lse else (ref, None))
                c = compare(o_g, o_r, l_g, l_r)
                guard_ok = bool(big[n:].isnan().all())
                ok = (c["rel"] < 2e-2 and c["finite"] and guard_ok and o_g.data_ptr() == out.data_ptr()
                      and (not want_lse or (c["lse_inf_match"] and c["lse_max_abs"] < 2e-2)))
                # rows of query blocks with no kept block: exact zeros
                if empty_q.any() and not perm:
                    rows = empty_q.expand(B, H, nb).repeat_interleave(128, -1)[..., :S]  # (B, H, S)
                    z = o_g.permute(0, 2, 1, 3)[rows]
                    c["empty_rows_zero"] = bool((z == 0).all())
                    ok = ok and c["empty_rows_zero"]
                if vs_triton:  # second opinion; a failure of the Triton kernel is reported, not counted
                    try:
                        tri = triton_block_sparse_attention(q, k, v, layout, return_lse=want_lse)
                        o_t = tri[0] if want_lse else tri
                        c["vs_triton_rel"] = compare(o_g, o_t)["rel"]
                        ok = ok and c["vs_triton_rel"] < 2e-2
                    except Exception as e:
                        c["triton_error"] = repr(e)
            case.update(c, guard_ok=guard_ok, first_call_s=t_first, ok=bool(ok))
            extra = f" vs_triton_rel={c['vs_triton_rel']:.2e}" if "vs_triton_rel" in c else ""
            extra += f" lse_abs={c['lse_max_abs']:.2e} lse_inf_match={c['lse_inf_match']}" if want_lse else ""
            extra += f" empty_rows_zero={c['empty_rows_zero']}" if "empty_rows_zero" in c else ""
            print(f"[check] {name}: max_rel={c['rel']:.2e}{extra} guard={guard_ok} first_call={t_first:.1f}s "
                  f"{'OK' if ok else 'FAIL'}", flush=True)
        except Exception as e:
            case.update(ok=False, error=repr(e))
            print(f"[check] {name}: EXCEPTION {e!r} FAIL", flush=True)
            traceback.print_exc()
        wd.disarm()
        results["correctness"].append(case)
        _dump(results, args)


# ------------------------------------------------------------------------------------------------- speed
def bench(args, eng, results, wd, deadline):
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparse_dit.kernels.triton_attention import triton_block_sparse_attention
    from sparse_dit.layout import Layout

    B, H, S, D = args.bench_shape
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    nb = -(-S // 128)
    dense_flop = 4.0 * B * H * D * S * S

    def timed(fn):
        fn()
        _sync()
        if DEV != "cuda":  # dry run: one wall-clock call
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep)

    # cuDNN dense first (the baseline every row is read against)
    wd.arm("bench cudnn")
    case = dict(kind="cudnn_sdpa_dense", B=B, H=H, S=S, D=D, density=1.0)
    try:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)

        ms = timed(sdpa)
        case.update(ms=ms, tflops=dense_flop / (ms * 1e-3) / 1e12)
        print(f"[bench] cuDNN dense B={B} H={H} S={S}: {ms:.3f} ms {case['tflops']:.1f} TFLOP/s", flush=True)
    except Exception as e:
        case.update(error=repr(e))
        print(f"[bench] cuDNN dense: EXCEPTION {e!r}", flush=True)
    wd.disarm()
    results["bench"].append(case)
    _dump(results, args)

    for kind in ("random", "window"):
        for density in args.densities:
            name = f"{kind} density={density}"
            if time.time() > deadline:
                print(f"[bench] {name}: SKIPPED (time budget)", flush=True)
                results["bench"].append(dict(kind=kind, density=density, skipped="time budget"))
                continue
            wd.arm(f"bench {name}", args.case_timeout + 20)  # the first one compiles the Triton kernel
            row = dict(kind=kind, density=density, B=B, H=H, S=S, D=D)
            try:
                if kind == "random":
                    mask = random_block_mask(1, H, nb, density, gen, DEV)
                else:
                    mask = window_block_mask(1, H, nb, density, DEV)
                layout = Layout.from_block_mask(mask, 128, S)
                flop = 4.0 * D * kept_pairs(mask, S, B)  # pairs summed over batch and heads
                row["eff_density"] = flop / dense_flop
                with torch.no_grad():
                    t0 = time.time()
                    og = eng.gluon_block_sparse_attention(q, k, v, layout)
                    _sync()
                    row["gluon_first_call_s"] = time.time() - t0  # includes the layout conversion (cached after)
                    ms = timed(lambda: eng.gluon_block_sparse_attention(q, k, v, layout))
                    row.update(gluon_ms=ms, gluon_tflops=flop / (ms * 1e-3) / 1e12)
                    for tag, kw in args.variant_list:  # same mask, same inputs: A/B against the default kernel

                        def run_variant(kw=kw):
                            return eng.gluon_block_sparse_attention(q, k, v, layout, **kw)

                        try:
                            row[f"{tag}_vs_default_rel"] = compare(run_variant(), og)["rel"]
                            ms = timed(run_variant)
                            row[f"{tag}_ms"], row[f"{tag}_tflops"] = ms, flop / (ms * 1e-3) / 1e12
                            print(f"[bench] {name} variant {tag}: {ms:.3f} ms {row[f'{tag}_tflops']:.1f} TFLOP/s "
                                  f"(rel to default {row[f'{tag}_vs_default_rel']:.1e})", flush=True)
                        except Exception as e:
                            row[f"{tag}_error"] = repr(e)
                            print(f"[bench] {name} variant {tag}: EXCEPTION {e!r}", flush=True)
                    try:
                        ot = triton_block_sparse_attention(q, k, v, layout)
                        row["gluon_vs_triton_rel"] = compare(og, ot)["rel"]
                        del ot
                        ms = timed(lambda: triton_block_sparse_attention(q, k, v, layout))
                        row.update(triton_ms=ms, triton_tflops=flop / (ms * 1e-3) / 1e12)
                    except Exception as e:
                        row["triton_error"] = repr(e)
                print(f"[bench] {name} (eff {row['eff_density']:.3f}): gluon {row['gluon_ms']:.3f} ms "
                      f"{row['gluon_tflops']:.1f} TFLOP/s | triton {row.get('triton_ms', float('nan')):.3f} ms "
                      f"{row.get('triton_tflops', float('nan')):.1f} TFLOP/s | gluon vs triton rel "
                      f"{row.get('gluon_vs_triton_rel', float('nan')):.2e}", flush=True)
            except Exception as e:
                row.update(error=repr(e))
                print(f"[bench] {name}: EXCEPTION {e!r}", flush=True)
                traceback.print_exc()
            wd.disarm()
            results["bench"].append(row)
            _dump(results, args)


def _install_stand_in(eng):
    """--dry-run-cpu: the kernel's contract in torch (fp32 masked softmax over the listed blocks) in place of the
    launch, so the script's cases, comparisons, watchdog and JSON can be exercised without a GPU."""
    import torch

    def launch(q, k, v, out, lse, cnt, idx, scale, persistent=True):
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        L, _, NQ, W = idx.shape
        used = torch.arange(W) < cnt[..., None].long()
        blocks = torch.zeros(L, H, NQ, -(-Sk // 128) + 1, dtype=torch.bool)
        blocks.scatter_(-1, torch.where(used, idx.long(), blocks.shape[-1] - 1), True)
        tok = blocks[..., :-1].repeat_interleave(128, 2)[:, :, :Sq].repeat_interleave(128, 3)[..., :Sk]
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        s = s.masked_fill(~tok.expand(B, H, Sq, Sk), float("-inf"))
        m = s.amax(-1, keepdim=True).clamp(min=-1e30)
        p = torch.exp(s - m)
        l_ = p.sum(-1, keepdim=True)
        out.copy_(torch.einsum("bhqk,bkhd->bqhd", p / l_.clamp(min=1e-30), v.float()).to(out.dtype))
        if lse is not None:
            lse.copy_(torch.where(l_[..., 0] > 0, (m + l_.log())[..., 0], float("-inf")))

    eng._launch = launch
    eng.gluon_device_ok = lambda q: True
    eng.gluon_available = lambda: True


def run_gpu(args):
    t_start = time.time()
    import torch

    eng = load_engine()
    import triton

    if args.dry_run_cpu:
        _install_stand_in(eng)
    results = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run: torch stand-in kernel)",
                   torch=torch.__version__, triton=triton.__version__,
                   gluon_available=eng.gluon_available(), gluon_import_error=eng.gluon_import_error(),
                   correctness=[], bench=[])
    print(f"device={results['device']} torch={torch.__version__} triton={triton.__version__} "
          f"gluon_available={results['gluon_available']} ({results['gluon_import_error']})", flush=True)
    wd = Watchdog(args, results)
    if not results["gluon_available"]:
        print("Gluon engine not available here: nothing to run", flush=True)
        _dump(results, args)
        return 1
    # the whole script must end within args.budget seconds: later cases are skipped past their share
    if "correct" in args.sections:
        check(args, eng, results, wd, deadline=t_start + args.budget * 0.45)
    if "bench" in args.sections:
        bench(args, eng, results, wd, deadline=t_start + args.budget - 6)
    ok = all(c.get("ok") for c in results["correctness"] if "skipped" not in c)
    results["all_correct"] = ok
    results["elapsed_s"] = time.time() - t_start
    path = _dump(results, args)
    print(f"all correctness cases OK: {ok}; elapsed {results['elapsed_s']:.1f}s" + (f"; wrote {path}" if path else ""),
          flush=True)
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90a without a GPU and report")
    ap.add_argument("--dump-ir", action="store_true", help="with --compile-only and --out: write ttgir/ptx")
    ap.add_argument("--out", default=None, help="output directory (or .json path)")
    ap.add_argument("--sections", default="correct,bench")
    ap.add_argument("--bench-shape", type=int, nargs=4, default=[2, 12, 32760, 128], metavar=("B", "H", "S", "D"))
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--variants", default="",
                    help="comma list of extra Gluon kernel variants timed on the same masks: np = one CTA per query "
                         "block instead of the persistent grid")
    ap.add_argument("--per-tile", action="store_true", help="correctness cases with one CTA per query block")
    ap.add_argument("--case-timeout", type=float, default=25.0, help="seconds before a case counts as hung (exit 124)")
    ap.add_argument("--budget", type=float, default=78.0, help="seconds for the whole GPU run; later cases skipped")
    ap.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.variant_list = []
    for tag in filter(None, args.variants.split(",")):
        if tag != "np":
            ap.error(f"--variants: the only variant is np (one CTA per query block); got {tag!r}")
        args.variant_list.append((tag, dict(persistent=False)))
    if args.dry_run_cpu:
        global DEV
        DEV = "cpu"
    if args.compile_only:
        sys.exit(compile_only(args))
    sys.exit(run_gpu(args))


if __name__ == "__main__":
    main()
