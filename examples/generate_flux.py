r"""FLUX.1 text-to-image with sparse-dit.

Example (FLUX.1-dev, 1024x1024, 28 steps, compared with dense):

    python examples/generate_flux.py --prompt "A cat holding a sign that says hello world" \
        --pattern tile --dense-steps 6 --output cat.png --compare-dense

--guidance is FLUX.1-dev's embedded (distilled) guidance. FLUX.1-schnell:
--model black-forest-labs/FLUX.1-schnell --steps 4 --guidance 0 --max-sequence-length 256.
True classifier-free guidance with --negative-prompt needs --true-cfg > 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Family, add_true_cfg_argument, run, true_cfg_kwargs  # noqa: E402

FAMILY = Family(
    name="FLUX.1 text-to-image (FluxPipeline)",
    model="black-forest-labs/FLUX.1-dev",
    height=1024, width=1024, steps=28, guidance=3.5,
    output="images",  # FluxPipeline returns .images: (batch, H, W, 3)
    prompt="A red fox sitting in fresh snow in a birch forest at sunrise, photorealistic, highly detailed.",
)


if __name__ == "__main__":
    from diffusers import FluxPipeline

    run(FluxPipeline, FAMILY, true_cfg_kwargs, description=__doc__, add_arguments=add_true_cfg_argument)
