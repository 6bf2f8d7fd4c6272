"""Patch a real diffusers WanTransformer3DModel (small config, random weights, no download) with a
local 3-D window block mask and compare its output with the dense model: relative error, density, time.
Proves the installation end to end on any machine; on a GPU the Triton kernel runs."""

from __future__ import annotations

import argparse
import time

import torch

from ._common import check_block_size, check_backend, check_non_negative, check_positive, resolve_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=5, help="post-patchify frames (default 5)")
    p.add_argument("--height", type=int, default=12, help="post-patchify height (default 12)")
    p.add_argument("--width", type=int, default=20, help="post-patchify width (default 20)")
    p.add_argument("--block-size", type=int, default=64, help="block size of the mask in tokens, at least 16 (default 64)")
    p.add_argument("--window", type=int, default=2, help="key blocks kept on each side of a query block (default 2)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def window_block_mask(seq_len: int, block: int, window: int) -> torch.Tensor:
    """(1, 1, NB, NB) band of ``window`` blocks on each side of the diagonal, plus the first block (a sink)."""
    nb = -(-seq_len // block)
    i = torch.arange(nb)
    mask = (i[:, None] - i[None, :]).abs() <= window
    mask[:, 0] = True
    return mask[None, None]


def run(args: argparse.Namespace) -> int:
    check_positive(args, "--frames", "--height", "--width", "--layers")
    check_non_negative(args, "--window")
    check_block_size(args.block_size)
    device = resolve_device(args.device)
    backend_label = check_backend("auto", device)

    from diffusers import WanTransformer3DModel

    import sparse_dit

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=512, num_layers=args.layers, rope_max_seq_len=1024,
    ).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, args.frames, 2 * args.height, 2 * args.width, generator=g).to(device, dtype)
    t = torch.tensor([700], device=device)
    text = torch.randn(1, 16, 64, generator=g).to(device, dtype)
    S = args.frames * args.height * args.width

    def timed() -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            model(x, t, text)  # warm-up (kernel compilation, layout building)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(x, t, text).sample
            if device.type == "cuda":
                torch.cuda.synchronize()
        return out.float(), time.perf_counter() - start

    dense, t_dense = timed()
    mask = window_block_mask(S, args.block_size, args.window)
    sparse_dit.patch(model, pattern=sparse_dit.PatternSpec("mask", block_mask=mask, block_size=args.block_size))
    sparse, t_sparse = timed()
    stats = sparse_dit.patch_state(model).stats
    density = stats["density_sum"] / max(1, stats["sparse_calls"])
    sparse_dit.unpatch(model)
    restored, _ = timed()
    rel = ((sparse - dense).norm() / dense.norm()).item()
    print(f"model        WanTransformer3DModel, {args.layers} layers, 4 heads x 64, {S} tokens, {dtype}, {device}")
    print(f"backend      {backend_label}")
    print(f"pattern      window of {args.window} blocks of {args.block_size} tokens each side + sink block")
    print(f"density      {density:.3f}")
    print(f"rel. error   {rel:.4f} (sparse vs dense output)")
    print(f"time         dense {t_dense * 1e3:.1f} ms, sparse {t_sparse * 1e3:.1f} ms")
    print(f"unpatch      {'bit-identical' if torch.equal(restored, dense) else 'DIFFERENT'}")
    return 0 if torch.equal(restored, dense) and rel < 1.0 else 1
