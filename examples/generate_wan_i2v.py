r"""Wan 2.1 / 2.2 image-to-video with sparse-dit: animate ``--image`` following ``--prompt``.

Example (Wan 2.1 I2V 14B 480P, compared with dense):

    python examples/generate_wan_i2v.py --image first_frame.png --prompt "The cat turns its head and blinks" \
        --pattern tile --dense-steps 10 --output cat.mp4 --compare-dense

The image is resized to --height x --width. Wan 2.2 I2V checkpoints (two transformers, no CLIP image
encoder), e.g. Wan-AI/Wan2.2-I2V-A14B-Diffusers, work too; both transformers are patched.
Wan's I2V prompt cleaning needs the `ftfy` package (pip install ftfy).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, load_image, run  # noqa: E402

FAMILY = Family(
    name="Wan 2.1 / 2.2 image-to-video (WanImageToVideoPipeline)",
    model="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    height=480, width=832, frames=81, fps=16, steps=50, guidance=5.0,
    output="frames",  # (batch, T, H, W, 3)
)


def add_arguments(parser):
    parser.add_argument("--image", required=True, help="path or URL of the first frame")
    parser.add_argument("--last-image", default=None, help="optional path or URL of the last frame (first-last-frame checkpoints)")
    parser.add_argument("--guidance-2", type=float, default=None,
                        help="Wan 2.2 only: guidance of the low-noise transformer_2 (default: --guidance)")


def call_kwargs(args):
    return {
        "image": load_image(args.image),
        "last_image": load_image(args.last_image) if args.last_image else None,
        "guidance_scale_2": args.guidance_2,
    }


if __name__ == "__main__":
    import importlib.util

    from diffusers import WanImageToVideoPipeline

    if importlib.util.find_spec("ftfy") is None and not {"-h", "--help"} & set(sys.argv):
        sys.exit("WanImageToVideoPipeline cleans prompts with ftfy, which is not installed: pip install ftfy")

    run(WanImageToVideoPipeline, FAMILY, call_kwargs, description=__doc__, add_arguments=add_arguments)
