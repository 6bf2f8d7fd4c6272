"""A small trained video DiT that ships with sparse-dit: the model fidelity tests, the profiler's tests and
``sparse-dit demo`` run on, offline.

    from sparse_dit.reference import load_reference_model
    ref = load_reference_model(device="cpu")
    frames = ref.generate("one shape: a red circle bouncing; camera still", seed=0, steps=10)  # (16, 64, 64, 3) uint8

What it is: diffusers' `WanTransformer3DModel` (8 layers, 4 heads of dim 64, patch (1, 4, 4), about 9M
parameters, fp16 weights in ``assets/``) trained by rectified flow on the procedural clips of
`sparse_dit.reference.videos` (examples/train_reference.py), prompted through a learned word table
(`PromptEncoder`) instead of an external text encoder.
"""

from __future__ import annotations

from .model import (
    ASSETS,
    SAMPLING,
    TRANSFORMER_CONFIG,
    ReferenceModel,
    build_transformer,
    load_reference_model,
    make_scheduler,
    model_to_video,
    video_to_model,
)
from .text import PromptEncoder
from .videos import render, render_batch, render_scenes, sample_scene

# Prompts that cover the vocabulary; the demo, the harness and the tests use them (their real clips: seeds below).
DEMO_PROMPTS = (
    "one shape: a red circle bouncing; camera still",
    "two shapes: a yellow square spinning, a blue ring sliding; camera pans left",
    "one shape: a green triangle spinning; camera pans right",
    "three shapes: a white ring still, an orange circle bouncing, a magenta square sliding; camera still",
)

__all__ = [
    "ASSETS",
    "DEMO_PROMPTS",
    "PromptEncoder",
    "ReferenceModel",
    "SAMPLING",
    "TRANSFORMER_CONFIG",
    "build_transformer",
    "load_reference_model",
    "make_scheduler",
    "model_to_video",
    "render",
    "render_batch",
    "render_scenes",
    "sample_scene",
    "video_to_model",
]
