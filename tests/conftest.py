"""Shared builders: real diffusers components with small configs and random weights (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the kernel tests run Triton's interpreter, which must be chosen before triton is first imported;
# a module collected earlier (tests/test_gluon_engine.py imports triton.experimental.gluon) may import it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_wan_transformer(heads: int = 2, head_dim: int = 16, layers: int = 2, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        rope_max_seq_len=64,
    ).eval()


def wan_inputs(batch: int = 1, frames: int = 3, height: int = 6, width: int = 10, seed: int = 1):
    """Latents for a post-patchify grid (frames, height, width) of the transformer above."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    text = torch.randn(batch, 7, 32, generator=g)
    return x, t, text


@pytest.fixture
def wan():
    return make_wan_transformer()


def make_wan_pipeline(transformer=None):
    """A real WanPipeline with a tiny VAE and no text encoder (tests pass prompt embeddings)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer if transformer is not None else make_wan_transformer(),
    )
