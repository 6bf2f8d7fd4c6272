"""Procedural videos with a prompt that describes them: the training data of the reference model.

Each clip has one to four textured shapes (circle, square, triangle, ring) in distinct colours that
bounce off the walls of the scene, spin, slide sideways, cross the whole scene on a long straight path or
stay still, drawn back to front so they occlude each other, over a two-colour gradient background with a
stripe texture and soft landmark blobs. A camera looks at the scene: it stays still, pans (left, right,
up, down) or zooms (in, out), so everything in view moves together, shapes leave and re-enter the frame,
and attention must follow content across space and time. Everything is a pure function of a seed: the
scene parameters are drawn with a ``numpy`` generator seeded by it and the pixels are rendered with torch
on any device, at any frame count and any (height, width).

    >>> scene = sample_scene(seed=1)
    >>> scene.prompt                                            # doctest: +SKIP
    'two shapes: a yellow circle bouncing, an orange ring crossing; camera zooms in'
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
MOTIONS = ("bouncing", "spinning", "sliding", "still", "crossing")
# camera moves: "left"/"right"/"up"/"down" pan, "in"/"out" zoom; the prompt says "camera pans left", "camera zooms in"
CAMERAS = ("left", "right", "still", "up", "down", "in", "out")
COUNTS = ("one", "two", "three", "four")
PAN_SPEED = 0.35  # canvas widths per clip
ZOOM_RANGE = 1.6  # a zoom scales the view by this factor over the clip
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
    x: float  # centre at t=0, in scene units (x right over [0, 1], y down over [0, height / width])
    y: float  # as a fraction of the scene's height (scaled by the aspect ratio when rendered)
    vx: float  # velocity in scene units per clip (clip time runs 0..1)
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
    landmarks: tuple[tuple[float, float, float], ...] = ()  # soft background blobs: (x, y, radius) in scene units


def describe(shapes: tuple[Shape, ...], camera: str) -> str:
    """The prompt of a scene: count, then colour/shape/motion of each shape, then the camera."""
    count = COUNTS[len(shapes) - 1]
    parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind} {s.motion}" for s in shapes]
    noun = "shape" if len(shapes) == 1 else "shapes"
    if camera == "still":
        cam = "camera still"
    elif camera in ("in", "out"):
        cam = f"camera zooms {camera}"
    else:
        cam = f"camera pans {camera}"
    return f"{count} {noun}: {', '.join(parts)}; {cam}"


def sample_scene(seed: int, count: int | None = None) -> Scene:
    """A random scene, a pure function of ``seed`` (and ``count`` shapes, 1 to 4, if given)."""
    rng = np.random.default_rng(int(seed))
    n = int(count) if count is not None else int(rng.choice([1, 2, 3, 4], p=[0.25, 0.3, 0.25, 0.2]))
    if not 1 <= n <= len(COUNTS):
        raise ValueError(f"count must be 1 to {len(COUNTS)}; got {count}")
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    shapes = []
    for i in range(n):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        radius = float(rng.uniform(0.09, 0.17))
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
        elif motion == "crossing":  # a long straight path from outside one edge to outside the opposite one
            sign = 1.0 if rng.random() < 0.5 else -1.0
            drift = float(rng.uniform(-0.3, 0.3))
            if rng.random() < 0.6:  # horizontal
                x, vx, vy = 0.5 - sign * (0.5 + radius), sign * (1.0 + 2 * radius), drift
            else:  # vertical (y is a fraction of the height)
                y, vy, vx = 0.5 - sign * (0.5 + radius), sign * (1.0 + 2 * radius), drift
            spin = float(rng.uniform(-1.0, 1.0))
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
    camera = CAMERAS[int(rng.choice(len(CAMERAS), p=[0.15, 0.15, 0.2, 0.1, 0.1, 0.15, 0.15]))]
    landmarks = tuple(
        (float(rng.uniform(-0.2, 1.2)), float(rng.uniform(-0.2, 1.2)), float(rng.uniform(0.06, 0.16)))
        for _ in range(int(rng.integers(2, 6)))
    )
    shapes_t = tuple(shapes)
    return Scene(
        shapes=shapes_t,
        camera=camera,
        background=int(rng.integers(len(BACKGROUNDS))),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        texture_period=float(rng.uniform(0.12, 0.25)),
        prompt=describe(shapes_t, camera),
        landmarks=landmarks,
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


_COLS = ("kind", "r", "g", "b", "x", "y", "vx", "vy", "radius", "angle", "spin", "stripes", "present", "bounce")
# camera: pan velocity (x, y) in scene units per clip, log zoom at t=0 and its change over the clip
_CAMERA = {
    "left": (-PAN_SPEED, 0.0, 0.0, 0.0),
    "right": (PAN_SPEED, 0.0, 0.0, 0.0),
    "up": (0.0, -PAN_SPEED, 0.0, 0.0),
    "down": (0.0, PAN_SPEED, 0.0, 0.0),
    "in": (0.0, 0.0, 0.0, math.log(ZOOM_RANGE)),
    "out": (0.0, 0.0, math.log(ZOOM_RANGE), -math.log(ZOOM_RANGE)),
    "still": (0.0, 0.0, 0.0, 0.0),
}
_MAX_LANDMARKS = 5


def _scene_tensors(scenes: list[Scene], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes (B, N, len(_COLS)), background (B, 12) and landmark (B, 5, 4) parameters; absent slots have
    present = 0."""
    n = max(len(sc.shapes) for sc in scenes)
    rows = []
    for sc in scenes:
        slots = []
        for j in range(n):
            if j < len(sc.shapes):
                s = sc.shapes[j]
                slots.append(
                    [SHAPES.index(s.kind), *COLOURS[s.colour], s.x, s.y, s.vx, s.vy, s.radius, s.angle, s.spin,
                     s.stripes, 1.0, 0.0 if s.motion == "crossing" else 1.0]
                )
            else:
                slots.append([0, 0, 0, 0, 0.5, 0.5, 0, 0, 0.1, 0, 0, 0.5, 0.0, 1.0])
        rows.append(slots)
    bg = [
        [*BACKGROUNDS[sc.background][0], *BACKGROUNDS[sc.background][1], sc.gradient_angle, sc.texture_period,
         *_CAMERA[sc.camera]]
        for sc in scenes
    ]
    marks = [
        [[*m, 1.0] for m in sc.landmarks[:_MAX_LANDMARKS]] + [[0.0, 0.0, 0.1, 0.0]] * (_MAX_LANDMARKS - len(sc.landmarks[:_MAX_LANDMARKS]))
        for sc in scenes
    ]
    return (
        torch.tensor(rows, dtype=torch.float32, device=device),
        torch.tensor(bg, dtype=torch.float32, device=device),
        torch.tensor(marks, dtype=torch.float32, device=device),
    )


def render_scenes(
    scenes: list[Scene], frames: int = 16, height: int = 64, width: int = 64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Pixels of several scenes at once: (B, frames, height, width, 3) float32 in [0, 1].

    Clip time runs from 0 (first frame) to 1 (last). The scene spans x over [0, 1] (right) and y over
    [0, height / width] (down), so pixels are square at any frame size; the camera's view starts on the
    whole scene and then pans or zooms. Vectorised over the batch.
    """
    dev = torch.device(device)
    shp, bg, marks = _scene_tensors(list(scenes), dev)
    aspect = height / width
    t = (torch.linspace(0.0, 1.0, frames, device=dev) if frames > 1 else torch.zeros(1, device=dev))[None, :, None, None]
    sy = ((torch.arange(height, device=dev, dtype=torch.float32) + 0.5) / width)[None, None, :, None]
    sx = ((torch.arange(width, device=dev, dtype=torch.float32) + 0.5) / width)[None, None, None, :]

    def col(x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 1, 1, 1)
        return x[:, None, None, None]

    # the camera: screen point -> scene point (pan moves the view centre, zoom scales about it)
    zoom = torch.exp(col(bg[:, 10]) + col(bg[:, 11]) * t)  # (B, T, 1, 1)
    gx = 0.5 + col(bg[:, 8]) * t + (sx - 0.5) / zoom
    gy = 0.5 * aspect + col(bg[:, 9]) * aspect * t + (sy - 0.5 * aspect) / zoom
    # background: a gradient in a fixed direction, a stripe texture and soft landmark blobs, all in scene units
    lo, hi = bg[:, None, None, None, 0:3], bg[:, None, None, None, 3:6]
    ang, period = col(bg[:, 6]), col(bg[:, 7])
    g = (((gx - 0.5) * torch.cos(ang) + (gy - 0.5 * aspect) * torch.sin(ang)) / 1.4 + 0.5).clamp(0, 1)[..., None]
    texture = 0.5 + 0.5 * torch.cos(2 * math.pi * (gx + 0.35 * gy) / period)  # (B, T, H, W)
    light = torch.zeros_like(texture)
    for m in range(marks.shape[1]):
        mx, my, mr, on = (col(marks[:, m, i]) for i in range(4))
        d2 = (gx - mx) ** 2 + (gy - my * aspect) ** 2
        light = light + on * torch.exp(-d2 / (mr * mr))
    img = (lo * (1 - g) + hi * g) * (0.85 + 0.15 * texture[..., None]) + 0.25 * light.clamp(max=1.0)[..., None] * hi
    sharp = 1.5 * width * zoom  # edges about one pixel soft at any zoom
    c = {name: i for i, name in enumerate(_COLS)}
    for j in range(shp.shape[1]):  # back to front: later shapes occlude earlier ones
        s = shp[:, j]
        kind = col(s[:, c["kind"]]).round().long()
        r = col(s[:, c["radius"]])
        free_x = col(s[:, c["x"]]) + col(s[:, c["vx"]]) * t
        free_y = (col(s[:, c["y"]]) + col(s[:, c["vy"]]) * t) * aspect
        bounce = col(s[:, c["bounce"]]) > 0.5  # crossing shapes fly straight through the walls
        cx = torch.where(bounce, _bounce(free_x, r, 1.0), free_x)
        cy = torch.where(bounce, _bounce(free_y, r, aspect), free_y)
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
