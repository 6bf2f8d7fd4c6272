r"""Wan 2.1 / 2.2 text-to-video with sparse-dit.

Example (Wan 2.1 1.3B, 480x832, 81 frames, tile attention after 10 dense steps, compared with dense):

    python examples/generate_wan.py --prompt "A red fox trotting through fresh snow" \
        --pattern tile --dense-steps 10 --output fox.mp4 --compare-dense

Wan 2.2 checkpoints with two transformers (high- and low-noise experts) load the same way; both
transformers are patched, ``--guidance-2`` sets the low-noise expert's guidance, and
``--profile transformer=A.json,transformer_2=B.json`` gives each its own profile:

    python examples/generate_wan.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --guidance 4.0 --guidance-2 3.0 \
        --steps 40 --pattern '{"name": "tile", "window": [3, 3, 3]}' --output wan22.mp4
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, run  # noqa: E402

FAMILY = Family(
    name="Wan 2.1 / 2.2 text-to-video (WanPipeline)",
    model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    height=480, width=832, frames=81, fps=16, steps=50, guidance=5.0,
    output="frames",  # WanPipeline returns .frames: (batch, T, H, W, 3)
)


def add_arguments(parser):
    parser.add_argument("--guidance-2", type=float, default=None,
                        help="Wan 2.2 only: guidance of the low-noise transformer_2 (default: --guidance)")


def call_kwargs(args):
    return {"guidance_scale_2": args.guidance_2}


if __name__ == "__main__":
    from diffusers import WanPipeline

    run(WanPipeline, FAMILY, call_kwargs, description=__doc__, add_arguments=add_arguments)
