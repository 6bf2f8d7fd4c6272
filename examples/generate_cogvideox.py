r"""CogVideoX text-to-video with sparse-dit (CogVideoX-2b / -5b; CogVideoX1.5-5b at its own resolution).

Example (CogVideoX-5b, 480x720, 49 frames, compared with dense):

    python examples/generate_cogvideox.py --prompt "A panda playing guitar in a bamboo forest" \
        --pattern tile --dense-steps 10 --output panda.mp4 --compare-dense

CogVideoX1.5: --model THUDM/CogVideoX1.5-5B --height 768 --width 1360 --frames 81 --fps 16.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, run  # noqa: E402

FAMILY = Family(
    name="CogVideoX text-to-video (CogVideoXPipeline)",
    model="THUDM/CogVideoX-5b",
    height=480, width=720, frames=49, fps=8, steps=50, guidance=6.0,
    output="frames",  # (batch, T, H, W, 3)
)


def add_arguments(parser):
    parser.add_argument("--dynamic-cfg", action="store_true", help="use CogVideoX's dynamic (cosine-ramped) guidance")


def call_kwargs(args):
    return {"use_dynamic_cfg": args.dynamic_cfg}


if __name__ == "__main__":
    from diffusers import CogVideoXPipeline

    run(CogVideoXPipeline, FAMILY, call_kwargs, description=__doc__, add_arguments=add_arguments)
