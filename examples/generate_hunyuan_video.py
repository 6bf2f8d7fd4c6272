r"""HunyuanVideo text-to-video with sparse-dit.

Example (720x1280, 129 frames: the setting sliding tile attention was made for):

    python examples/generate_hunyuan_video.py --prompt "A cat walks on the grass, realistic" \
        --pattern tile --dense-steps 10 --output cat.mp4 --compare-dense --cpu-offload

--guidance is HunyuanVideo's embedded (distilled) guidance; real classifier-free guidance with
--negative-prompt needs --true-cfg > 1 and doubles the cost.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, add_true_cfg_argument, run, true_cfg_kwargs  # noqa: E402

FAMILY = Family(
    name="HunyuanVideo text-to-video (HunyuanVideoPipeline)",
    model="hunyuanvideo-community/HunyuanVideo",
    height=720, width=1280, frames=129, fps=24, steps=50, guidance=6.0,
    output="frames",  # (batch, T, H, W, 3)
    vae_tiling=True,
)


if __name__ == "__main__":
    from diffusers import HunyuanVideoPipeline

    run(HunyuanVideoPipeline, FAMILY, true_cfg_kwargs, description=__doc__, add_arguments=add_true_cfg_argument)
