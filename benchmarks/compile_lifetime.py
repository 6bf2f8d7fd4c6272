"""Which tensors of a Wan block outlive their eager lifetime once the patched model is compiled (CPU, no GPU needed).

    python benchmarks/compile_lifetime.py

Under torch.compile each patched self-attention call runs eagerly between two compiled graphs (a graph break), and
on the H200 a compiled patched step peaks 3-5% above the compiled dense one even for the static tile pattern, while
eager it does not (benchmarks/results/e2e.md, 2026-12-04). This shows one reason without a GPU: a tiny Wan
transformer (diffusers' class, random weights) is run eager and with `compile_repeated_blocks` (backend aot_eager, the
same graph splits as inductor), and at the entry of block 0's feed-forward network (the block's memory peak at real
sizes) it reports whether the self-attention's input and output tensors are still alive (weak references). Eager,
both are freed by then; compiled, the self-attention output (B, S, model dim: 0.72 GiB at Wan2.1-14B 720p) is alive,
because it is an input of the graph that runs the rest of the block and its caller's frame holds it.

The probes are forward hooks wrapped in `torch.compiler.disable`, like sparse-dit's own; "unpatched" rows show the
same probes without sparse-dit.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import sparse_dit  # noqa: E402


def tiny_wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()


def alive_at_ffn(patched: bool, compiled: bool) -> dict[str, bool]:
    """{"self-attention input", "self-attention output"}: alive when block 0's feed-forward network starts."""
    wan = tiny_wan()
    if patched:
        sparse_dit.patch(wan, pattern="tile", block_size=16, backend="reference")
    refs: dict[str, weakref.ref] = {}
    seen: list[dict[str, bool]] = []

    def attn_in(module, args, kwargs):
        refs["self-attention input"] = weakref.ref(args[0] if args else kwargs["hidden_states"])

    def attn_out(module, args, kwargs, output):
        refs["self-attention output"] = weakref.ref(output)

    def ffn_in(module, args):
        seen.append({name: ref() is not None for name, ref in refs.items()})

    block = wan.blocks[0]
    block.attn1.register_forward_pre_hook(torch.compiler.disable(attn_in), with_kwargs=True)
    block.attn1.register_forward_hook(torch.compiler.disable(attn_out), with_kwargs=True)
    block.ffn.register_forward_pre_hook(torch.compiler.disable(ffn_in))
    if compiled:
        wan.compile_repeated_blocks(fullgraph=False, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 12, 20, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        for _ in range(2):  # the second call runs the compiled code
            wan(x, torch.tensor([500]), text)
    if patched:
        sparse_dit.unpatch(wan)
    return seen[-1]


def main() -> int:
    for patched in (False, True):
        for compiled in (False, True):
            row = alive_at_ffn(patched, compiled)
            label = f"{'patched' if patched else 'unpatched'}, {'compiled' if compiled else 'eager'}"
            print(f"{label:20s} alive at the FFN: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
