r"""Stable Diffusion 3 / 3.5 text-to-image with sparse-dit.

Example (SD 3.5 Medium, 1024x1024, 40 steps, compared with dense):

    python examples/generate_sd3.py --prompt "A capybara wearing a suit, holding a sign that reads Hello World" \
        --pattern tile --dense-steps 8 --output capybara.png --compare-dense

SD 3.5 Large: --model stabilityai/stable-diffusion-3.5-large --steps 28 --guidance 3.5.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, run  # noqa: E402

FAMILY = Family(
    name="Stable Diffusion 3 / 3.5 text-to-image (StableDiffusion3Pipeline)",
    model="stabilityai/stable-diffusion-3.5-medium",
    height=1024, width=1024, steps=40, guidance=4.5,
    output="images",  # (batch, H, W, 3)
    prompt="A red fox sitting in fresh snow in a birch forest at sunrise, photorealistic, highly detailed.",
)


if __name__ == "__main__":
    from diffusers import StableDiffusion3Pipeline

    run(StableDiffusion3Pipeline, FAMILY, description=__doc__)
