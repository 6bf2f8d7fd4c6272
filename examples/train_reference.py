"""Train sparse-dit's reference video DiT (`sparse_dit.reference`) on procedural clips, by rectified flow.

The shipped weights: first trained on 4,096-token clips (one H100, 1,600 steps), then continued at mixed
geometries up to the Wan2.1 480p token grid (21 x 120 x 208 px = 21 x 30 x 52 = 32,760 tokens) on one H200:

    python examples/train_reference.py --out OUT --init sparse_dit/reference/assets --scale 480p \
        --steps 1400 --train-seconds 470 --lr 3e-4 --warmup 100

(`benchmarks/results/reference_model.md` records the runs.) It writes OUT/transformer/ (diffusers
save_pretrained, fp16 safetensors), OUT/text_encoder/, OUT/loss.csv (one row every 10 steps, with the clip
geometry) and, unless --no-figures, OUT/loss.png, OUT/samples.png (generated next to real clips) and
OUT/attention.png. Copy transformer/ and text_encoder/ into sparse_dit/reference/assets/ to ship them.

Debug on a CPU in seconds: python examples/train_reference.py --out /tmp/ref --tiny --steps 3
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()  # run from a checkout without installing

from sparse_dit.reference import model as refmodel  # noqa: E402
from sparse_dit.reference.text import PromptEncoder  # noqa: E402
from sparse_dit.reference.videos import render_scenes, sample_scene  # noqa: E402

# (frames, height, width, share of steps). "small": mostly 4,096-token 16 x 64 x 64 clips. "480p": from the
# demo size up to the Wan2.1 480p token grid (21 x 30 x 52 tokens), several frame counts and aspect ratios
# (landscape, square, portrait), so one model serves the CPU demo and the long sequences where sparse
# attention pays. The batch is scaled so that every step sees about the same number of tokens.
SCALES = {
    "small": ((16, 64, 64, 0.6), (16, 48, 48, 0.15), (12, 48, 48, 0.1), (8, 32, 32, 0.15)),
    "480p": (
        (16, 64, 64, 0.12), (8, 32, 32, 0.04), (12, 48, 80, 0.06), (21, 60, 104, 0.1), (17, 96, 96, 0.08),
        (9, 104, 64, 0.05), (13, 120, 208, 0.1), (21, 96, 168, 0.1), (21, 120, 208, 0.35),
    ),
}
TRAIN_SEED_BASE = 1_000_000  # clips with seeds below this are never trained on (held out for evaluation)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps (the learning-rate schedule spans them)")
    p.add_argument("--train-seconds", type=float, default=480.0, help="wall-clock cap: stop early past it")
    p.add_argument("--batch", type=int, default=32, help="clips per step at 16 x 64 x 64 (others: same tokens)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small", help="the mix of clip geometries")
    p.add_argument("--init", type=Path, help="continue from this checkpoint (transformer/ and text_encoder/)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-drop", type=float, default=0.1, help="share of prompts replaced by the null prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model and clips, to debug the script on a CPU")
    p.add_argument("--no-figures", action="store_true")
    return p.parse_args()


def sample_sigma(n: int, shift: float, device: torch.device) -> torch.Tensor:
    """Noise levels: logit-normal, then the same time shift the sampler uses."""
    s = torch.sigmoid(torch.randn(n, device=device))
    return shift * s / (1 + (shift - 1) * s)


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = dict(refmodel.TRANSFORMER_CONFIG)
    buckets = SCALES[args.scale]
    if args.tiny:
        config.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128)
        buckets = ((4, 32, 32, 0.5), (4, 16, 32, 0.5))
    if args.init is not None:
        transformer, text = load_init(args.init, config if args.tiny else None)
        transformer, text = transformer.to(dev).train(), text.to(dev).train()
        print(f"continuing from {args.init}", flush=True)
    else:
        transformer = refmodel.build_transformer(config).to(dev).train()
        text = PromptEncoder(**refmodel.TEXT_CONFIG).to(dev).train()
    ema_t = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_e = copy.deepcopy(text).eval().requires_grad_(False)
    params = list(transformer.parameters()) + list(text.parameters())
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer parameters: {n_params / 1e6:.2f}M, text encoder: {sum(p.numel() for p in text.parameters())}")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=dev.type == "cuda")
    shift = refmodel.SAMPLING["shift"]
    base_tokens = 16 * 64 * 64 if not args.tiny else 4 * 32 * 32
    weights = [b[3] for b in buckets]
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "loss.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "elapsed_s", "lr", "frames", "height", "width", "batch", "loss", "loss_ema"])
    start = time.time()
    step, seed_counter, loss_ema = 0, TRAIN_SEED_BASE, None
    while step < args.steps:
        if time.time() - start > args.train_seconds:
            break
        # the schedule ends at --steps or at --train-seconds, whichever comes first
        frac = min(1.0, max(step / args.steps, (time.time() - start) / args.train_seconds))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        frames, height, width, _ = rng.choices(buckets, weights)[0]
        batch = max(1, round(args.batch * base_tokens / (frames * height * width)))
        scenes = [sample_scene(seed_counter + i) for i in range(batch)]
        seed_counter += batch
        with torch.no_grad():
            x0 = refmodel.video_to_model(render_scenes(scenes, frames, height, width, dev))
            noise = torch.randn_like(x0)
            sigma = sample_sigma(batch, shift, dev)
            xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
            prompts = [sc.prompt if rng.random() >= args.cfg_drop else "" for sc in scenes]
            ids = text.tokenize(prompts).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            ctx = text(ids)
            pred = transformer(xt, sigma * 1000.0, ctx, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for src, dst in ((transformer, ema_t), (text, ema_e)):
                torch._foreach_lerp_(list(dst.parameters()), list(src.parameters()), 1 - decay)
        if step % 10 == 0 or step < 10:
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            writer.writerow([step, f"{time.time() - start:.2f}", f"{lr:.3e}", frames, height, width, batch,
                             f"{value:.5f}", f"{loss_ema:.5f}"])
            if step % 200 == 0:
                log.flush()
                print(f"step {step} t={time.time() - start:.0f}s lr={lr:.2e} loss={value:.4f} ema={loss_ema:.4f}",
                      flush=True)
        step += 1
    log.close()
    print(f"trained {step} steps in {time.time() - start:.0f}s; last smoothed loss {loss_ema:.4f}", flush=True)
    ema_t.half().save_pretrained(str(args.out / "transformer"), safe_serialization=True)
    ema_e.save_pretrained(args.out / "text_encoder")
    if not args.no_figures:
        try:
            figures(args.out, dev, tiny=args.tiny, scale=args.scale)
        except Exception as err:  # the weights are saved already; figures can be redrawn on any machine
            print(f"figures failed: {err!r}")
    print(f"total {time.time() - start:.0f}s", flush=True)
    return 0


def load_init(root: Path, tiny_config: "dict | None" = None) -> "tuple[torch.nn.Module, PromptEncoder]":
    """The checkpoint to continue from, in float32; its word table grows to the current vocabulary (words
    keep their rows, new words get fresh ones)."""
    from diffusers import WanTransformer3DModel

    from sparse_dit.reference.text import VOCAB

    if tiny_config is not None:
        transformer = refmodel.build_transformer(tiny_config)
    else:
        transformer = WanTransformer3DModel.from_pretrained(str(root / "transformer"), torch_dtype=torch.float32,
                                                            local_files_only=True)
    old = PromptEncoder.from_pretrained(root / "text_encoder", dtype=torch.float32)
    text = PromptEncoder(old.text_dim, old.max_len, VOCAB)
    with torch.no_grad():
        for word, i in text.index.items():
            if word in old.index:
                text.embed.weight[i] = old.embed.weight[old.index[word]]
        text.position.copy_(old.position)
        text.norm.load_state_dict(old.norm.state_dict())
    return transformer, text


def figures(out: Path, dev: torch.device, tiny: bool = False, scale: str = "small") -> None:
    """loss.png, samples.png (generated next to real clips of the same prompts) and attention.png, at the
    largest geometry of the training mix."""
    from sparse_dit.reference.figures import attention_figure, loss_figure, samples_figure

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    ref = refmodel.load_reference_model(dev, dtype, path=out)
    loss_figure(out / "loss.csv", out / "loss.png")
    if tiny:
        samples_figure(ref, out / "samples.png", frames=4, size=32, steps=4)
        attention_figure(ref, out / "attention.png", frames=4, size=32)
        return
    frames, height, width, _ = max(SCALES[scale], key=lambda b: b[0] * b[1] * b[2])
    samples_figure(ref, out / "samples.png", frames=frames, height=height, width=width)
    attention_figure(ref, out / "attention.png", frames=frames, height=height, width=width)


if __name__ == "__main__":
    sys.exit(main())
