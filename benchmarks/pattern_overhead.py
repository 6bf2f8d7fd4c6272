"""GPU cost of the dynamic patterns' planning (k-means + permutation, prune's scoring) vs dense attention.

    python benchmarks/pattern_overhead.py [--batch 2 --heads 12 --frames 21 --height 30 --width 52 --head-dim 128]

Defaults are Wan2.1-1.3B at 480p (B=2 for CFG, 12 heads, S=32760, D=128, bf16). Times are per attention
layer call (all heads), median of CUDA-event timed repeats. q/k are random, so k-means does not find the
structure of real activations; iteration counts are reported alongside.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from sparse_dit.geometry import Geometry  # noqa: E402
from sparse_dit.patterns import kmeans, prune  # noqa: E402


def timed(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=30)
    ap.add_argument("--width", type=int, default=52)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables of one warm k-means build")
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = Geometry(args.batch, args.heads, args.head_dim, args.frames, args.height, args.width)
    B, H, S, D = args.batch, args.heads, g.seq_len, args.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}; B={B} H={H} S={S} D={D} bf16")

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views, as diffusers passes them
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt), repeats=10)
            print(f"dense sdpa [{name}]: {ms:.2f} ms")
        except RuntimeError as err:
            print(f"dense sdpa [{name}]: unavailable ({str(err).splitlines()[0]})")

    for q_mode in ("union", "pad"):
        state: dict = {}
        torch.cuda.synchronize()
        cold = timed(lambda: kmeans.build(g, H, 128, dev, q=q, k=k, state=state.clear() or state, q_mode=q_mode), repeats=1, warmup=0)
        cold_iters = state[0]["iters"]
        noise = 0.05
        q2, k2 = q + noise * torch.randn_like(q), k + noise * torch.randn_like(k)
        lay = None

        def warm() -> None:
            nonlocal lay
            lay = kmeans.build(g, H, 128, dev, q=q2, k=k2, state=state, q_mode=q_mode)

        warm_ms = timed(warm, repeats=5, warmup=1)
        print(
            f"kmeans[{q_mode}] (Cq=128, Ck=512, top_p=0.9): cold {cold:.1f} ms ({cold_iters} iters q,k from random tokens), "
            f"warm {warm_ms:.1f} ms ({state[0]['iters']} iters), density {lay.density:.3f}"
        )
        for iters in (1, 2, 4):
            fixed = timed(lambda: kmeans.build(g, H, 128, dev, q=q2, k=k2, state=state, q_mode=q_mode, iters=iters, tol=0.0), repeats=5)
            print(f"kmeans[{q_mode}] warm, exactly {iters} Lloyd iteration(s): {fixed:.1f} ms")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        state = {}
        kmeans.build(g, H, 128, dev, q=q, k=k, state=state)  # cold start outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            kmeans.build(g, H, 128, dev, q=q2, k=k2, state=state)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
    for score in ("attn", "norm"):
        st: dict = {}
        ms = timed(lambda: prune.build(g, H, 128, dev, q=q, k=k, state=st, keep_ratio=0.3, score=score), repeats=10)
        print(f"prune[{score}] (keep 0.3, 64 sampled queries): {ms:.2f} ms")


if __name__ == "__main__":
    main()
