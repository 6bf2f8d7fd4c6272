r"""LTX-Video text-to-video with sparse-dit.

Example (480x704, 161 frames, compared with dense):

    python examples/generate_ltx_video.py --prompt "A woman with long brown hair walks along a beach at sunset" \
        --pattern tile --dense-steps 10 --output beach.mp4 --compare-dense

Frames should be 8k+1 and height/width multiples of 32.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, run  # noqa: E402

FAMILY = Family(
    name="LTX-Video text-to-video (LTXPipeline)",
    model="Lightricks/LTX-Video",
    height=480, width=704, frames=161, fps=24, steps=50, guidance=3.0,
    output="frames",  # (batch, T, H, W, 3)
    negative_prompt="worst quality, inconsistent motion, blurry, jittery, distorted",
)


def call_kwargs(args):
    # the frame rate conditions the model's RoPE; the decode noise settings are those of LTX-Video >= 0.9.1
    # and are ignored by VAEs without timestep conditioning
    return {"frame_rate": args.fps, "decode_timestep": 0.03, "decode_noise_scale": 0.025}


if __name__ == "__main__":
    from diffusers import LTXPipeline

    run(LTXPipeline, FAMILY, call_kwargs, description=__doc__)
