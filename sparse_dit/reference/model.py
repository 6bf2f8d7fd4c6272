"""The reference video DiT: a small diffusers `WanTransformer3DModel` trained on `videos`, plus its sampler.

Pixel space (RGB in [-1, 1]), patch (1, 4, 4): a 16 x 64 x 64 clip is 16 x 16 x 16 = 4,096 video tokens.
Sampling is rectified-flow Euler with diffusers' `FlowMatchEulerDiscreteScheduler` and classifier-free
guidance against the null prompt (all padding).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .text import PromptEncoder

ASSETS = Path(__file__).resolve().parent / "assets"

# The transformer's diffusers config (the same dict goes to WanTransformer3DModel(**TRANSFORMER_CONFIG)).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 4, 4),
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 128,
    "freq_dim": 128,
    "ffn_dim": 1024,
    "num_layers": 8,
    "rope_max_seq_len": 1024,
}
TEXT_CONFIG: dict[str, Any] = {"text_dim": 128, "max_len": 24}
# Sampling defaults; `shift` is the flow-matching time shift used in training and sampling alike.
SAMPLING: dict[str, Any] = {"shift": 2.0, "steps": 20, "guidance_scale": 4.0, "frames": 16, "height": 64, "width": 64}


def build_transformer(config: dict[str, Any] | None = None) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**(config or TRANSFORMER_CONFIG))


def make_scheduler(shift: float | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLING["shift"] if shift is None else shift)


def video_to_model(video: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) in [0, 1] -> the transformer's (B, 3, T, H, W) in [-1, 1]."""
    return video.permute(0, 4, 1, 2, 3) * 2.0 - 1.0


def model_to_video(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) float32 in [0, 1]."""
    return ((x.float().permute(0, 2, 3, 4, 1) + 1.0) / 2.0).clamp(0, 1)


@dataclass
class ReferenceModel:
    """The trained transformer, its prompt encoder and `generate`."""

    transformer: torch.nn.Module
    text_encoder: PromptEncoder
    device: torch.device
    dtype: torch.dtype
    shift: float = SAMPLING["shift"]

    @torch.no_grad()
    def generate(
        self,
        prompt: "str | list[str]",
        seed: int = 0,
        steps: int = SAMPLING["steps"],
        guidance_scale: float = SAMPLING["guidance_scale"],
        frames: int = SAMPLING["frames"],
        height: int = SAMPLING["height"],
        width: int = SAMPLING["width"],
        output: str = "uint8",
    ) -> "np.ndarray | torch.Tensor":
        """Sample a clip: (frames, height, width, 3), uint8 numpy (``output="uint8"``) or float32 torch in [0, 1]
        (``output="float"``). A list of prompts gives a leading batch dimension (seeds seed, seed+1, ...).

        Deterministic for a seed on a given device and dtype: the starting noise comes from a CPU
        ``torch.Generator`` seeded with ``seed``. height and width must be multiples of 4; any frame count
        and size the RoPE table covers works, the model was trained mostly on 16 x 64 x 64.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if height % 4 or width % 4:
            raise ValueError(f"height and width must be multiples of 4 (the patch size); got {height}x{width}")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        B = len(prompts)
        noise = torch.stack(
            [torch.randn(3, frames, height, width, generator=torch.Generator().manual_seed(int(seed) + i)) for i in range(B)]
        )
        x = noise.to(self.device, torch.float32)
        cond = self.text_encoder.encode(prompts, self.device).to(self.dtype)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            null = self.text_encoder.encode([""] * B, self.device).to(self.dtype)
            context = torch.cat([cond, null])
        else:
            context = cond
        scheduler = make_scheduler(self.shift)
        scheduler.set_timesteps(steps, device=self.device)
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            tt = t.expand(inp.shape[0]).to(self.device)
            v = self.transformer(inp.to(self.dtype), tt, context, return_dict=False)[0].float()
            if use_cfg:
                v_c, v_u = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = scheduler.step(v, t, x, return_dict=False)[0]
        video = model_to_video(x).cpu()
        if output == "float":
            return video if B > 1 or not isinstance(prompt, str) else video[0]
        out = (video * 255.0 + 0.5).to(torch.uint8).numpy()
        return out if not isinstance(prompt, str) else out[0]


def load_reference_model(
    device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float32, path: "str | Path | None" = None
) -> ReferenceModel:
    """Load the shipped reference model (offline, from the package's assets) onto ``device`` in ``dtype``.

    On CPU use float32 (fp16 matmuls on CPU are slow); on a GPU float16 or bfloat16. ``path`` (or the
    environment variable SPARSE_DIT_REFERENCE) points at another checkpoint of the same layout.
    """
    from diffusers import WanTransformer3DModel

    root = Path(path or os.environ.get("SPARSE_DIT_REFERENCE") or ASSETS)
    tdir, edir = root / "transformer", root / "text_encoder"
    if not (tdir / "config.json").exists():
        raise FileNotFoundError(
            f"no reference model at {root}: expected transformer/ and text_encoder/ there "
            "(train one with examples/train_reference.py)"
        )
    transformer = WanTransformer3DModel.from_pretrained(str(tdir), torch_dtype=dtype, local_files_only=True)
    transformer = transformer.to(device).eval()
    text_encoder = PromptEncoder.from_pretrained(edir, dtype=dtype).to(device)
    meta_path = root / "sampling.json"
    shift = json.loads(meta_path.read_text()).get("shift", SAMPLING["shift"]) if meta_path.exists() else SAMPLING["shift"]
    return ReferenceModel(transformer, text_encoder, torch.device(device), dtype, shift)


__all__ = [
    "ASSETS",
    "SAMPLING",
    "TEXT_CONFIG",
    "TRANSFORMER_CONFIG",
    "ReferenceModel",
    "build_transformer",
    "load_reference_model",
    "make_scheduler",
    "model_to_video",
    "video_to_model",
]
