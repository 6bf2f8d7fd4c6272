"""Train sparse-dit's reference video DiT (`sparse_dit.reference`) on procedural clips, by rectified flow.

The command that produced the shipped weights (one H100, about 5.5 minutes of training):

    python examples/train_reference.py --out OUT --steps 1600 --batch 32

It writes OUT/transformer/ (diffusers save_pretrained, fp16 safetensors), OUT/text_encoder/, OUT/loss.csv
and, unless --no-figures, OUT/samples.png (generated next to real clips) and OUT/attention.png.
Copy transformer/ and text_encoder/ into sparse_dit/reference/assets/ to ship them.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparse_dit.reference import model as refmodel  # noqa: E402
from sparse_dit.reference.text import PromptEncoder  # noqa: E402
from sparse_dit.reference.videos import render_scenes, sample_scene  # noqa: E402

# (frames, size, share of steps): mostly the 4,096-token 16 x 64 x 64 clips, some smaller grids so the
# model also samples well at the cheaper sizes the CPU demo and the tests use. The batch is scaled so that
# every step sees about the same number of tokens.
BUCKETS = ((16, 64, 0.6), (16, 48, 0.15), (12, 48, 0.1), (8, 32, 0.15))
TRAIN_SEED_BASE = 1_000_000  # clips with seeds below this are never trained on (held out for evaluation)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps (the learning-rate schedule spans them)")
    p.add_argument("--train-seconds", type=float, default=480.0, help="wall-clock cap: stop early past it")
    p.add_argument("--batch", type=int, default=32, help="clips per step at 16 x 64 x 64")
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
    buckets = BUCKETS
    if args.tiny:
        config.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128)
        buckets = ((4, 32, 0.5), (4, 16, 0.5))
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
    weights = [b[2] for b in buckets]
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "loss.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "elapsed_s", "lr", "frames", "size", "batch", "loss", "loss_ema"])
    start = time.time()
    step, seed_counter, loss_ema = 0, TRAIN_SEED_BASE, None
    while step < args.steps:
        if time.time() - start > args.train_seconds:
            break
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        frames, size, _ = rng.choices(buckets, weights)[0]
        batch = max(1, round(args.batch * base_tokens / (frames * size * size)))
        scenes = [sample_scene(seed_counter + i) for i in range(batch)]
        seed_counter += batch
        with torch.no_grad():
            x0 = refmodel.video_to_model(render_scenes(scenes, frames, size, size, dev))
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
            writer.writerow([step, f"{time.time() - start:.2f}", f"{lr:.3e}", frames, size, batch, f"{value:.5f}",
                             f"{loss_ema:.5f}"])
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
            figures(args.out, dev, tiny=args.tiny)
        except Exception as err:  # the weights are saved already; figures can be redrawn on any machine
            print(f"figures failed: {err!r}")
    print(f"total {time.time() - start:.0f}s", flush=True)
    return 0


def figures(out: Path, dev: torch.device, tiny: bool = False) -> None:
    """samples.png (generated next to real clips of the same prompts) and attention.png."""
    from sparse_dit.reference.figures import attention_figure, loss_figure, samples_figure

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    ref = refmodel.load_reference_model(dev, dtype, path=out)
    kw = dict(frames=4, size=32, steps=4) if tiny else {}
    loss_figure(out / "loss.csv", out / "loss.png")
    samples_figure(ref, out / "samples.png", **kw)
    attention_figure(ref, out / "attention.png", **({"frames": 4, "size": 32} if tiny else {}))


if __name__ == "__main__":
    sys.exit(main())
