"""Procedural videos with a prompt that describes them: the training data of the reference model.

Each clip has one to three textured shapes (circle, square, triangle, ring) in distinct colours that
bounce off the walls, spin, slide sideways or stay still, drawn back to front so they occlude each
other, over a two-colour gradient background with a moving stripe texture (the camera pans left,
right or stays). Everything is a pure function of a seed: the scene parameters are drawn with a
``numpy`` generator seeded by it and the pixels are rendered with torch on any device.

    >>> scene = sample_scene(seed=1)
    >>> scene.prompt
    'two shapes: a yellow circle bouncing, an orange ring sliding; camera pans left'
    >>> video = render(scene, frames=16, height=64, width=64)   # (16, 64, 64, 3) float in [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "ring")
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.90, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}
MOTIONS = ("bouncing", "spinning", "sliding", "still")
CAMERAS = ("left", "right", "still")
COUNTS = ("one", "two", "three")
BACKGROUNDS = (  # dark, desaturated gradients so every shape colour stands out
    ((0.10, 0.10, 0.18), (0.30, 0.25, 0.35)),
    ((0.05, 0.15, 0.10), (0.25, 0.35, 0.30)),
    ((0.20, 0.12, 0.08), (0.40, 0.30, 0.25)),
    ((0.08, 0.08, 0.08), (0.35, 0.35, 0.40)),
)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    motion: str
    x: float  # centre at t=0, in [0, 1] canvas units (x right, y down)
    y: float
    vx: float  # velocity in canvas units per second of clip (clip time runs 0..1)
    vy: float
    radius: float
    angle: float  # rotation at t=0 (radians)
    spin: float  # radians per clip
    stripes: float  # stripe period as a fraction of the radius


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    camera: str
    background: int
    gradient_angle: float
    texture_period: float
    prompt: str = field(default="")


def describe(shapes: tuple[Shape, ...], camera: str) -> str:
    """The prompt of a scene: count, then colour/shape/motion of each shape, then the camera."""
    count = COUNTS[len(shapes) - 1]
    parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind} {s.motion}" for s in shapes]
    noun = "shape" if len(shapes) == 1 else "shapes"
    cam = "camera still" if camera == "still" else f"camera pans {camera}"
    return f"{count} {noun}: {', '.join(parts)}; {cam}"


def sample_scene(seed: int, count: int | None = None) -> Scene:
    """A random scene, a pure function of ``seed`` (and ``count`` shapes, 1 to 3, if given)."""
    rng = np.random.default_rng(int(seed))
    n = int(count) if count is not None else int(rng.integers(1, 4))
    if not 1 <= n <= 3:
        raise ValueError(f"count must be 1, 2 or 3; got {count}")
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    shapes = []
    for i in range(n):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        radius = float(rng.uniform(0.11, 0.19))
        x, y = (float(v) for v in rng.uniform(radius, 1 - radius, size=2))
        speed = float(rng.uniform(0.7, 1.4))
        heading = float(rng.uniform(0, 2 * math.pi))
        if motion == "bouncing":
            vx, vy, spin = speed * math.cos(heading), speed * math.sin(heading), float(rng.uniform(-0.6, 0.6))
        elif motion == "sliding":
            vx, vy, spin = speed * (1 if rng.random() < 0.5 else -1), 0.0, 0.0
        elif motion == "spinning":
            vx, vy = 0.08 * math.cos(heading), 0.08 * math.sin(heading)
            spin = float(rng.uniform(2.5, 4.5)) * (1 if rng.random() < 0.5 else -1)
        else:
            vx = vy = spin = 0.0
        shapes.append(
            Shape(
                kind=kind,
                colour=str(colours[i]),
                motion=motion,
                x=x,
                y=y,
                vx=vx,
                vy=vy,
                radius=radius,
                angle=float(rng.uniform(0, 2 * math.pi)),
                spin=spin,
                stripes=float(rng.uniform(0.45, 0.8)),
            )
        )
    camera = CAMERAS[int(rng.integers(len(CAMERAS)))]
    shapes_t = tuple(shapes)
    return Scene(
        shapes=shapes_t,
        camera=camera,
        background=int(rng.integers(len(BACKGROUNDS))),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        texture_period=float(rng.uniform(0.12, 0.25)),
        prompt=describe(shapes_t, camera),
    )


def _bounce(p: torch.Tensor, r: torch.Tensor, extent: float) -> torch.Tensor:
    """Fold an unconstrained coordinate into [r, extent - r], as a ball reflecting off both walls."""
    length = (extent - 2.0 * r).clamp_min(1e-6)
    y = torch.remainder(p - r, 2.0 * length)
    return r + torch.where(y < length, y, 2.0 * length - y)


def _sdf(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of each clip's shape, centred at the origin of its rotated frame.

    kind indexes SHAPES; all four distances are computed and the right one picked per clip.
    """
    radial = torch.sqrt(u * u + v * v)
    circle = radial - r
    square = torch.maximum(u.abs(), v.abs()) - 0.8 * r
    tri = None
    for k in range(3):
        a = math.pi / 2 + k * 2 * math.pi / 3
        e = u * math.cos(a) + v * math.sin(a)
        tri = e if tri is None else torch.maximum(tri, e)
    triangle = tri - 0.5 * r
    ring = (radial - 0.72 * r).abs() - 0.28 * r
    return torch.stack([circle, square, triangle, ring]).gather(0, kind.expand_as(circle)[None]).squeeze(0)


_COLS = ("kind", "r", "g", "b", "x", "y", "vx", "vy", "radius", "angle", "spin", "stripes", "present")


def _scene_tensors(scenes: list[Scene], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes (B, N, len(_COLS)) and background (B, 9) parameters; absent shape slots have present = 0."""
    n = max(len(sc.shapes) for sc in scenes)
    rows = []
    for sc in scenes:
        slots = []
        for j in range(n):
            if j < len(sc.shapes):
                s = sc.shapes[j]
                slots.append(
                    [SHAPES.index(s.kind), *COLOURS[s.colour], s.x, s.y, s.vx, s.vy, s.radius, s.angle, s.spin,
                     s.stripes, 1.0]
                )
            else:
                slots.append([0, 0, 0, 0, 0.5, 0.5, 0, 0, 0.1, 0, 0, 0.5, 0.0])
        rows.append(slots)
    pan = {"left": 0.35, "right": -0.35, "still": 0.0}  # the scenery moves opposite to the camera
    bg = [
        [*BACKGROUNDS[sc.background][0], *BACKGROUNDS[sc.background][1], sc.gradient_angle, sc.texture_period,
         pan[sc.camera]]
        for sc in scenes
    ]
    return (
        torch.tensor(rows, dtype=torch.float32, device=device),
        torch.tensor(bg, dtype=torch.float32, device=device),
    )


def render_scenes(
    scenes: list[Scene], frames: int = 16, height: int = 64, width: int = 64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Pixels of several scenes at once: (B, frames, height, width, 3) float32 in [0, 1].

    Clip time runs from 0 (first frame) to 1 (last). x runs right over [0, 1]; y runs down over
    [0, height / width], so pixels are square at any frame size. Vectorised over the batch.
    """
    dev = torch.device(device)
    shp, bg = _scene_tensors(list(scenes), dev)
    aspect = height / width
    t = torch.linspace(0.0, 1.0, frames, device=dev)[None, :, None, None]  # (1, T, 1, 1)
    gy = ((torch.arange(height, device=dev, dtype=torch.float32) + 0.5) / width)[None, None, :, None]
    gx = ((torch.arange(width, device=dev, dtype=torch.float32) + 0.5) / width)[None, None, None, :]

    def col(x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 1, 1, 1)
        return x[:, None, None, None]

    # background: a gradient in a fixed direction plus a stripe texture that moves with the camera
    lo, hi = bg[:, None, None, None, 0:3], bg[:, None, None, None, 3:6]
    ang, period, pan = col(bg[:, 6]), col(bg[:, 7]), col(bg[:, 8])
    g = (((gx - 0.5) * torch.cos(ang) + (gy - 0.5 * aspect) * torch.sin(ang)) / 1.4 + 0.5).clamp(0, 1)[..., None]
    texture = 0.5 + 0.5 * torch.cos(2 * math.pi * (gx + pan * t + 0.35 * gy) / period)  # (B, T, H, W)
    img = (lo * (1 - g) + hi * g) * (0.85 + 0.15 * texture[..., None])
    sharp = 1.5 * width  # edges about one pixel soft
    c = {name: i for i, name in enumerate(_COLS)}
    for j in range(shp.shape[1]):  # back to front: later shapes occlude earlier ones
        s = shp[:, j]
        kind = col(s[:, c["kind"]]).round().long()
        r = col(s[:, c["radius"]])
        cx = _bounce(col(s[:, c["x"]]) + col(s[:, c["vx"]]) * t, r, 1.0)
        cy = _bounce(col(s[:, c["y"]]) * aspect + col(s[:, c["vy"]]) * t, r, aspect)
        theta = col(s[:, c["angle"]]) + col(s[:, c["spin"]]) * t
        dx, dy = gx - cx, gy - cy
        cos, sin = torch.cos(theta), torch.sin(theta)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        alpha = torch.sigmoid(-_sdf(kind, u, v, r) * sharp) * col(s[:, c["present"]])
        stripe = 0.5 + 0.5 * torch.cos(2 * math.pi * u / (col(s[:, c["stripes"]]) * r))
        colour = s[:, None, None, None, c["r"] : c["b"] + 1]
        img = img * (1 - alpha[..., None]) + colour * (0.65 + 0.35 * stripe[..., None]) * alpha[..., None]
    return img.clamp(0, 1)


def render(
    scene: Scene, frames: int = 16, height: int = 64, width: int = 64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Pixels of one scene: (frames, height, width, 3) float32 in [0, 1]."""
    return render_scenes([scene], frames, height, width, device)[0]


def render_batch(
    seeds: "list[int] | range",
    frames: int = 16,
    height: int = 64,
    width: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[str]]:
    """Clips of several seeds: (B, frames, height, width, 3) float in [0, 1] and their prompts."""
    scenes = [sample_scene(int(s)) for s in seeds]
    return render_scenes(scenes, frames, height, width, device), [sc.prompt for sc in scenes]


__all__ = ["COLOURS", "MOTIONS", "SHAPES", "Scene", "Shape", "describe", "render", "render_batch", "render_scenes", "sample_scene"]
