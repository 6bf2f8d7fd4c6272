"""Shared machinery of the ``generate_<family>.py`` examples: arguments, loading, generating, comparing.

Each example script only declares its family (`Family`: default checkpoint, resolution, frames, steps,
guidance, how the pipeline returns its frames) and maps the parsed arguments onto its pipeline's
call; `run` does the rest:

1. load the pipeline with ``from_pretrained`` (a hub id or a local directory) in ``--dtype`` on
   ``--device`` (or with model CPU offload);
2. with ``--compare-dense``: generate once with dense attention (diffusers' own tqdm progress bar);
3. ``sparse_dit.patch`` the pipeline with ``--pattern`` or ``--profile`` and generate again from the
   same seed;
4. write the sparse result to ``--output`` (mp4 through imageio-ffmpeg for video, png for images),
   and with ``--compare-dense`` also the dense result and a side-by-side (dense left, sparse right);
5. print the mean attention density (``patch_state(transformer).stats["mean_density"]``), the times
   and, with ``--compare-dense``, PSNR / SSIM of sparse against dense and the speed-up.

The printed summary lines start with ``[sparse-dit]`` and have fixed forms (``PSNR: 31.20 dB``,
``SSIM: 0.9512``, ``speed-up: 1.62x ...``) so scripts and tests can read them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

TAG = "[sparse-dit]"


@dataclass(frozen=True)
class Family:
    """What an example script declares about its model family.

    name: shown in ``--help``. model: default hub id. height/width/frames/steps/guidance/fps: defaults
    (frames None for image families). output: attribute of the pipeline's output holding the batch of
    results ("frames" for video pipelines, "images" for image pipelines). negative_prompt: default
    negative prompt (None: the pipeline's own). vae_tiling: decode in tiles by default (saves memory on
    long videos).
    """

    name: str
    model: str
    height: int
    width: int
    steps: int
    guidance: float
    frames: int | None = None
    fps: int = 16
    output: str = "frames"
    negative_prompt: str | None = None
    prompt: str = "A red fox trotting through fresh snow in a birch forest at sunrise, cinematic, highly detailed."
    vae_tiling: bool = False

    @property
    def video(self) -> bool:
        return self.frames is not None


# ------------------------------------------------------------------------------------------ arguments
def add_true_cfg_argument(parser: argparse.ArgumentParser) -> None:
    """--true-cfg for pipelines whose --guidance is an embedded (distilled) guidance (Flux, HunyuanVideo)."""
    parser.add_argument("--true-cfg", type=float, default=1.0,
                        help="true classifier-free guidance scale, used with --negative-prompt when > 1 (default: %(default)s)")


def true_cfg_kwargs(args: argparse.Namespace) -> dict:
    return {"true_cfg_scale": args.true_cfg}


def _pattern_arg(value: str) -> Any:
    """A pattern name, or a JSON object such as '{"name": "tile", "window": [3, 3, 3]}'."""
    text = value.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--pattern is not valid JSON ({e}): {value}") from None
        if not isinstance(spec, dict) or "name" not in spec:
            raise argparse.ArgumentTypeError('a JSON --pattern needs a "name", e.g. {"name": "tile", "window": [3, 3, 3]}')
        return spec
    return text


def _profile_arg(value: str) -> Any:
    """A profile path or shipped name, or 'transformer=A.json,transformer_2=B.json' for two-transformer pipelines."""
    parts = [p for p in value.split(",") if p]
    if len(parts) > 1 or (parts and "=" in parts[0] and not os.path.exists(parts[0])):
        mapping = {}
        for part in parts:
            name, sep, path = part.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"--profile mapping entries look like transformer=PATH; got {part!r}")
            mapping[name.strip()] = path.strip()
        return mapping
    return value


def build_parser(family: Family, description: str | None = None) -> argparse.ArgumentParser:
    """The common command line of every example; scripts may add their own arguments to it."""
    from sparse_dit import patterns

    parser = argparse.ArgumentParser(
        description=description or f"Generate with {family.name}, sparse-dit patched.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("model and generation")
    g.add_argument("--model", default=family.model, help="hub id or local directory of the diffusers checkpoint (default: %(default)s)")
    g.add_argument("--prompt", default=family.prompt, help="text prompt")
    g.add_argument("--negative-prompt", default=family.negative_prompt, help="negative prompt (default: %(default)r)")
    g.add_argument("--height", type=int, default=family.height, help="output height in pixels (default: %(default)s)")
    g.add_argument("--width", type=int, default=family.width, help="output width in pixels (default: %(default)s)")
    if family.video:
        g.add_argument("--frames", type=int, default=family.frames, help="number of video frames (default: %(default)s)")
        g.add_argument("--fps", type=int, default=family.fps, help="frame rate of the written video (default: %(default)s)")
    g.add_argument("--steps", type=int, default=family.steps, help="denoising steps (default: %(default)s)")
    g.add_argument("--guidance", type=float, default=family.guidance, help="guidance scale (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed; dense and sparse runs use the same one (default: %(default)s)")
    g.add_argument("--max-sequence-length", type=int, default=None, help="prompt tokens given to the text encoder (default: the pipeline's)")

    s = parser.add_argument_group("sparse attention")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--profile", type=_profile_arg, default=None, metavar="PATH_OR_NAME",
                       help="a profile file from `sparse-dit profile` or the name of a shipped one; for Wan 2.2 "
                            "'transformer=A.json,transformer_2=B.json' gives each transformer its own")
    which.add_argument("--pattern", type=_pattern_arg, default=None, metavar="NAME_OR_JSON",
                       help=f"one pattern for every layer and head: a name ({', '.join(patterns.names())}) or JSON "
                            "such as '{\"name\": \"tile\", \"window\": [3, 3, 3]}' (default: tile, when no --profile)")
    s.add_argument("--dense-steps", type=int, default=None,
                   help="first denoising steps kept dense (default: 20%% of --steps with --pattern, 0 with --profile)")
    s.add_argument("--block-size", type=int, default=None, help="query block size of the sparse layouts (default: the profile's, else 128)")
    s.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                   help="attention backend: Triton on a supported GPU, else the PyTorch reference (default: %(default)s)")

    o = parser.add_argument_group("output and devices")
    ext = ".mp4" if family.video else ".png"
    o.add_argument("--output", default=f"output{ext}",
                   help=f"where to write the sparse result (default: %(default)s); with --compare-dense also "
                        f"<stem>_dense{ext} and <stem>_side_by_side{ext} (dense left, sparse right)")
    o.add_argument("--compare-dense", action="store_true",
                   help="also generate with dense attention from the same seed and print PSNR, SSIM and the speed-up")
    o.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    o.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    o.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload: keep only the running model on the GPU")
    o.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=family.vae_tiling,
                   help="decode the VAE in tiles to save memory (default: %(default)s)")
    return parser


# ------------------------------------------------------------------------------------------- helpers
def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


class _Clock:
    """Times one pipeline call: the whole call and its denoising loop (first transformer call to the
    end of the last step), without touching the pipeline's code."""

    def __init__(self, pipe: Any, device: Any) -> None:
        self.pipe, self.device = pipe, device
        self.loop_start: float | None = None
        self.last_step: float | None = None

    def _pre_hook(self, *_: Any) -> None:
        if self.loop_start is None:
            _sync(self.device)
            self.loop_start = time.perf_counter()

    def step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        _sync(self.device)
        self.last_step = time.perf_counter()
        return callback_kwargs

    def __call__(self, kwargs: dict) -> tuple[Any, float, float]:
        handles = [m.register_forward_pre_hook(self._pre_hook) for m in _transformers(self.pipe).values()]
        self.loop_start = self.last_step = None
        try:
            _sync(self.device)
            start = time.perf_counter()
            out = self.pipe(**kwargs, callback_on_step_end=self.step_end)
            _sync(self.device)
            total = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
        loop = (self.last_step - self.loop_start) if self.loop_start is not None and self.last_step is not None else float("nan")
        return out, total, loop


def _transformers(pipe: Any) -> dict[str, Any]:
    return {name: m for name in ("transformer", "transformer_2") if (m := getattr(pipe, name, None)) is not None}


def to_uint8(frames: Any):
    """Pipeline output (numpy floats in [0, 1], or PIL images) as uint8 (T, H, W, 3) / (H, W, 3)."""
    import numpy as np

    if isinstance(frames, (list, tuple)):
        return np.stack([to_uint8(f) for f in frames])
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().float().cpu().numpy()
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


def write_result(path: str | Path, frames: Any, fps: int | None) -> None:
    """mp4/gif/... for a clip (T, H, W, 3) through imageio(-ffmpeg), png/jpg for an image (H, W, 3)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.ndim == 4:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            raise SystemExit(f"{path}: a video needs a video file name, e.g. {path.with_suffix('.mp4')}")
        if path.suffix.lower() == ".mp4":
            imageio.mimwrite(path, list(frames), fps=fps or 16, codec="libx264", quality=8, macro_block_size=2)
        else:
            imageio.mimwrite(path, list(frames), fps=fps or 16)
    else:
        imageio.imwrite(path, frames)


def _with_suffix(path: str | Path, tag: str) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_{tag}{path.suffix}")


def _dtype(name: str, device: Any):
    import torch

    if name == "auto":
        return torch.bfloat16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    return getattr(torch, name)


def _dtype_kwarg(dtype) -> dict:
    """``dtype=`` for diffusers releases that renamed ``torch_dtype`` (0.42 on), ``torch_dtype=`` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}


def _check_sparse_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """The pattern as a PatternSpec and the profile(s) loaded, or a clear exit naming the problem."""
    from sparse_dit import PatternSpec
    from sparse_dit.profile import Profile

    try:
        if args.profile is None:
            return PatternSpec.coerce(args.pattern), None
        if isinstance(args.profile, dict):
            return None, {name: Profile.coerce(path) for name, path in args.profile.items()}
        return None, Profile.coerce(args.profile)
    except (ValueError, TypeError, FileNotFoundError) as e:
        sys.exit(f"{TAG} {'--profile' if args.profile is not None else '--pattern'}: {e}")


def common_call_kwargs(pipeline_class: Any, family: Family, args: argparse.Namespace) -> dict:
    """Arguments every family's pipeline call shares, restricted to those its ``__call__`` accepts."""
    kwargs = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        output_type="np",
    )
    if family.video:
        kwargs["num_frames"] = args.frames
    accepted = inspect.signature(pipeline_class.__call__).parameters
    return {k: v for k, v in kwargs.items() if v is not None and k in accepted}


def _print_density(pipe: Any) -> None:
    import sparse_dit

    for name, transformer in _transformers(pipe).items():
        state = sparse_dit.patch_state(transformer)
        if state is None:
            continue
        st = state.stats
        print(f"{TAG} attention density ({name}): {st['mean_density']:.4f} "
              f"(sparse self-attention calls: {st['sparse_calls']}, dense calls: {st['dense_calls']})")


# ----------------------------------------------------------------------------------------------- run
def run(
    pipeline_class: Any,
    family: Family,
    call_kwargs_fn: Callable[[argparse.Namespace], dict] | None = None,
    *,
    description: str | None = None,
    add_arguments: Callable[[Any], None] | None = None,
    argv: Sequence[str] | None = None,
) -> dict:
    """Parse the command line, load, generate dense (optional) and sparse, write, report.

    call_kwargs_fn(args) returns the family's own pipeline arguments (e.g. Flux's ``true_cfg_scale``,
    Wan I2V's ``image``); they are merged over `common_call_kwargs`, and a value of None removes a key.
    add_arguments(group) adds the family's own options to an argument group of the command line.
    Returns a summary dict (times, density, psnr, ssim, output paths).
    """
    parser = build_parser(family, description)
    if add_arguments is not None:
        add_arguments(parser.add_argument_group(f"{family.name}: options of this family"))
    args = parser.parse_args(argv)

    import torch

    import sparse_dit
    from sparse_dit.metrics import psnr, ssim

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype, device)
    if args.profile is None and args.pattern is None:
        args.pattern = "tile"
    if args.dense_steps is None:
        args.dense_steps = args.steps // 5 if args.pattern is not None else 0

    # bad patterns, missing profiles or inputs fail here, before minutes of loading
    pattern, profile = _check_sparse_args(args)
    kwargs = common_call_kwargs(pipeline_class, family, args)
    if call_kwargs_fn is not None:
        kwargs.update(call_kwargs_fn(args))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    print(f"{TAG} loading {pipeline_class.__name__} from {args.model} ({dtype}, {device}{', cpu offload' if args.cpu_offload else ''})")
    pipe = pipeline_class.from_pretrained(args.model, **_dtype_kwarg(dtype))
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if args.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    clock = _Clock(pipe, device)

    def generate(label: str):
        pipe.set_progress_bar_config(desc=label)
        out, total, loop = clock(dict(kwargs, generator=torch.Generator("cpu").manual_seed(args.seed)))
        result = to_uint8(getattr(out, family.output)[0])
        print(f"{TAG} {label}: denoising {loop:.2f} s, total {total:.2f} s ({args.steps} steps)")
        return result, total, loop

    summary: dict[str, Any] = {}
    dense = None
    if args.compare_dense:
        dense, summary["dense_total_s"], summary["dense_loop_s"] = generate("dense")

    what = f"profile {args.profile}" if args.profile is not None else f"pattern {args.pattern}"
    print(f"{TAG} patching with {what}, dense steps {args.dense_steps}, block size {args.block_size or 'default'}, backend {args.backend}")
    sparse_dit.patch(pipe, pattern=pattern, profile=profile, dense_steps=args.dense_steps,
                     block_size=args.block_size, backend=args.backend)
    sparse, summary["sparse_total_s"], summary["sparse_loop_s"] = generate("sparse")
    _print_density(pipe)
    summary["density"] = {n: sparse_dit.patch_state(t).stats["mean_density"] for n, t in _transformers(pipe).items()
                          if sparse_dit.patch_state(t) is not None}

    fps = getattr(args, "fps", None)
    write_result(args.output, sparse, fps)
    written = [str(args.output)]
    if dense is not None:
        summary["psnr"], summary["ssim"] = psnr(sparse, dense), ssim(sparse, dense)
        print(f"{TAG} PSNR: {summary['psnr']:.2f} dB (sparse vs dense)")
        print(f"{TAG} SSIM: {summary['ssim']:.4f} (sparse vs dense)")
        print(f"{TAG} speed-up: {summary['dense_loop_s'] / summary['sparse_loop_s']:.2f}x denoising, "
              f"{summary['dense_total_s'] / summary['sparse_total_s']:.2f}x end to end "
              "(one-off costs such as Triton compilation or first CUDA calls included)")
        for tag, frames in (("dense", dense), ("side_by_side", _side_by_side(dense, sparse))):
            path = _with_suffix(args.output, tag)
            write_result(path, frames, fps)
            written.append(str(path))
    print(f"{TAG} wrote {', '.join(written)}")
    summary["outputs"] = written
    return summary


def _side_by_side(dense, sparse):
    import numpy as np

    gap = np.full(dense.shape[:-2] + (8, 3), 255, dtype=np.uint8)  # a white bar between the two
    return np.concatenate([dense, gap, sparse], axis=-2)


def load_image(path: str):
    """An RGB PIL image from a path or URL (for image-conditioned pipelines)."""
    from diffusers.utils import load_image as _load

    if not (path.startswith(("http://", "https://")) or os.path.isfile(path)):
        sys.exit(f"--image {path}: no such file")
    return _load(path).convert("RGB")
