"""Look at what the reference model's self-attention heads do: capture q, k of ``blocks[i].attn1`` and
measure, per head, how far (in frames and in pixels of the patch grid) the attention mass reaches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention


class _Capture(TorchFunctionMode):
    def __init__(self, store: list) -> None:
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            q, k = (args + (None, None))[:2] if len(args) >= 2 else (kwargs["query"], kwargs["key"])
            self.store.append((q.detach().float().cpu(), k.detach().float().cpu()))
        return func(*args, **kwargs)


def _enter(mode: TorchFunctionMode):
    def hook(*_: Any) -> None:  # must return None: a pre-hook's return value replaces the inputs
        mode.__enter__()

    return hook


def _exit(mode: TorchFunctionMode):
    def hook(*_: Any) -> None:
        mode.__exit__(None, None, None)

    return hook


@torch.no_grad()
def capture_qk(transformer: torch.nn.Module, inputs: tuple, layers: "list[int] | None" = None) -> dict[int, tuple]:
    """Run ``transformer(*inputs)`` once and return {layer: (q, k)} of the self-attention, each (B, H, S, D)
    as diffusers' native attention backend passes them (after norms and RoPE)."""
    layers = list(range(len(transformer.blocks))) if layers is None else list(layers)
    stores: dict[int, list] = {i: [] for i in layers}
    handles = []
    for i in layers:
        attn = transformer.blocks[i].attn1
        mode = _Capture(stores[i])
        handles.append(attn.register_forward_pre_hook(_enter(mode)))
        handles.append(attn.register_forward_hook(_exit(mode), always_call=True))
    saved = [(b.attn1.processor, vars(b.attn1.processor).get("_attention_backend")) for b in transformer.blocks]
    try:
        for b in transformer.blocks:  # pin the SDPA path so the capture sees q and k
            if hasattr(b.attn1.processor, "_attention_backend"):
                b.attn1.processor._attention_backend = "native"
        transformer(*inputs)
    finally:
        for h in handles:
            h.remove()
        for proc, value in saved:
            if value is None:
                vars(proc).pop("_attention_backend", None)
            else:
                proc._attention_backend = value
    return {i: stores[i][0] for i in layers if stores[i]}


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities of query ``rows`` for every head: (B, H, len(rows), S)."""
    scale = q.shape[-1] ** -0.5
    rows = rows.to(q.device)
    return torch.softmax((q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale, dim=-1)


def head_reach(probs: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Mean attention-weighted distance of each head, in frames (``temporal``) and in patch-grid cells
    (``spatial``, Euclidean in h, w), plus the mass on the query's own frame (``same_frame``); each (H,)."""
    Fg, Hg, Wg = grid
    S = Fg * Hg * Wg
    idx = torch.arange(S)
    f, h, w = idx // (Hg * Wg), (idx // Wg) % Hg, idx % Wg
    rows = rows.cpu()
    qf, qh, qw = f[rows], h[rows], w[rows]
    dt = (f[None, :] - qf[:, None]).abs().float()  # (R, S)
    ds = torch.sqrt(((h[None, :] - qh[:, None]) ** 2 + (w[None, :] - qw[:, None]) ** 2).float())
    p = probs.float().mean(0).cpu()  # (H, R, S)
    return {
        "temporal": (p * dt).sum(-1).mean(-1),
        "spatial": (p * ds).sum(-1).mean(-1),
        "same_frame": (p * (dt == 0)).sum(-1).mean(-1),
    }


def head_survey(model: Any, prompt: str, seed: int = 0, t: float = 500.0, frames: int = 16, size: int = 64,
                queries: int = 256, height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """Attention reach of every (layer, head) of ``model`` (a `ReferenceModel`) on a noised real clip of
    ``frames`` x ``height`` x ``width`` pixels (height and width default to ``size``)."""
    from .model import video_to_model
    from .videos import render_batch

    height, width = height or size, width or size
    video, _ = render_batch([seed], frames, height, width)
    x0 = video_to_model(video)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    s = t / 1000.0
    x = ((1 - s) * x0 + s * noise).to(model.device, model.dtype)
    ctx = model.text_encoder.encode([prompt], model.device).to(model.dtype)
    tt = torch.tensor([t], device=model.device)
    qk = capture_qk(model.transformer, (x, tt, ctx))
    p = model.transformer.config.patch_size
    grid = (frames // p[0], height // p[1], width // p[2])
    S = grid[0] * grid[1] * grid[2]
    rows = torch.randperm(S, generator=g)[:queries]
    out = {"grid": grid, "layers": {}, "qk": qk}
    for layer, (q, k) in qk.items():
        out["layers"][layer] = head_reach(attention_rows(q, k, rows), rows, grid)
    return out


__all__ = ["attention_rows", "capture_qk", "head_reach", "head_survey"]
