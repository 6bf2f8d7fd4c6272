r"""Mochi 1 text-to-video with sparse-dit.

Example (480x848, 85 frames, compared with dense; Mochi is large: offload and VAE tiling help):

    python examples/generate_mochi.py --prompt "Close-up of a chameleon's eye, its scaly skin changing colour" \
        --pattern tile --dense-steps 12 --output chameleon.mp4 --compare-dense --cpu-offload

Frames should be 6k+1 (Mochi's VAE compresses time by 6).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, run  # noqa: E402

FAMILY = Family(
    name="Mochi 1 text-to-video (MochiPipeline)",
    model="genmo/mochi-1-preview",
    height=480, width=848, frames=85, fps=30, steps=64, guidance=4.5,
    output="frames",  # (batch, T, H, W, 3)
    vae_tiling=True,
)


if __name__ == "__main__":
    from diffusers import MochiPipeline

    run(MochiPipeline, FAMILY, description=__doc__)
