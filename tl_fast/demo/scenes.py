"""Procedural scenes for the built-in demo dataset.

Every image is a *scene*: one main object of the labelled class, a few smaller distractor objects of
other classes, on a textured background. A class is a (shape, colour family) pair; each class also
carries a preferred surface texture, but textures are shared between classes and every attribute is
jittered, so a classifier has to combine cues. Main objects sit anywhere in the frame (not centred) and
distractors are scattered around them, so a random resized crop often misses the main object or
catches a distractor: the case token labeling exists for.

An image is a pure function of ``(seed, split, class, index)``: each one seeds its own generator, so
images can be generated in any order (or in parallel) and the same seed gives the same bytes.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "star", "cross", "ring", "crescent", "bowtie")
# Colour families: (name, hue in degrees). Hues are jittered per object.
COLOURS = (("red", 0.0), ("yellow", 52.0), ("green", 125.0), ("blue", 220.0),
           ("purple", 285.0), ("orange", 25.0), ("cyan", 180.0), ("pink", 325.0))
TEXTURES = ("solid", "stripes", "dots", "checker")
SPLITS = {"train": 1, "val": 2}
# Bumped whenever the rendering changes, so cached demo data from an older generator is rebuilt.
GENERATOR_VERSION = 2

_SUPERSAMPLE = 2  # shape masks are drawn at 2x and downsampled: soft, anti-aliased edges


@dataclass(frozen=True)
class ClassSpec:
    """What makes a class: a shape, a colour family and a preferred texture."""

    index: int
    shape: str
    colour: str
    hue: float
    texture: str

    @property
    def name(self) -> str:
        """Folder name; the zero-padded index makes sorted folder order equal class order."""
        return f"{self.index:02d}_{self.colour}_{self.shape}"


def class_specs(num_classes: int, shapes: tuple[str, ...] = SHAPES) -> list[ClassSpec]:
    """The first ``num_classes`` classes over ``shapes``: shapes cycle fastest, then colour families."""
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown or not shapes:
        raise ValueError(f"demo shapes must be some of {', '.join(SHAPES)}, got {shapes!r}")
    limit = len(shapes) * len(COLOURS)
    if not 2 <= num_classes <= limit:
        raise ValueError(f"the demo supports 2..{limit} classes with {len(shapes)} shapes, got {num_classes}")
    specs = []
    for i in range(num_classes):
        s, c = i % len(shapes), i // len(shapes)
        # The texture is a cue, not a give-away: each texture is shared by a quarter of the classes.
        texture = TEXTURES[(s + 2 * c) % len(TEXTURES)]
        specs.append(ClassSpec(i, shapes[s], COLOURS[c][0], COLOURS[c][1], texture))
    return specs


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One colour, ``h`` in degrees, ``s``/``v`` in [0, 1] -> float RGB in [0, 1]."""
    h = (h % 360.0) / 60.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def _shape_points(shape: str, n_star: int = 5) -> list[list[tuple[float, float]]]:
    """Polygons (lists of (x, y) in [-1, 1]) whose union/even-odd fill is the shape."""
    if shape == "disc":
        return [[(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 48, endpoint=False)]]
    if shape == "square":
        return [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]]
    if shape == "triangle":
        return [[(0.0, -1.0), (0.95, 0.7), (-0.95, 0.7)]]
    if shape == "star":
        pts = []
        for k in range(2 * n_star):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / n_star
            pts.append((r * math.cos(a), r * math.sin(a)))
        return [pts]
    if shape == "cross":
        w = 0.32
        return [[(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                 (-1, -w), (-w, -w)]]
    if shape == "bowtie":
        return [[(-1, -0.8), (0, -0.1), (1, -0.8), (1, 0.8), (0, 0.1), (-1, 0.8)]]
    raise ValueError(shape)


def _shape_mask(shape: str, size: int, angle: float, aspect: float) -> np.ndarray:
    """A soft ``[size, size]`` float mask of the shape, rotated by ``angle`` (radians)."""
    big = size * _SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    ca, sa = math.cos(angle), math.sin(angle)
    half = big / 2.0

    def tr(pts):
        out = []
        for x, y in pts:
            x, y = x * aspect, y / aspect
            out.append((half + 0.44 * big * (ca * x - sa * y) / max(aspect, 1.0),
                        half + 0.44 * big * (sa * x + ca * y) / max(1.0 / aspect, 1.0)))
        return out

    if shape == "ring":
        disc = _shape_points("disc")[0]
        draw.polygon(tr(disc), fill=255)
        draw.polygon(tr([(0.55 * x, 0.55 * y) for x, y in disc]), fill=0)
    elif shape == "crescent":
        disc = _shape_points("disc")[0]
        draw.polygon(tr(disc), fill=255)
        draw.polygon(tr([(0.85 * x + 0.45, 0.85 * y - 0.1) for x, y in disc]), fill=0)
    else:
        for poly in _shape_points(shape):
            draw.polygon(tr(poly), fill=255)
    img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) * (1.0 / 255.0)


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[size, size]`` modulation in about [0.55, 1.1] for the object's surface."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "solid":
        return 1.0 + 0.06 * rng.standard_normal((size, size)).astype(np.float32)
    period = max(3.0, size * rng.uniform(0.12, 0.2))
    a = rng.uniform(0, math.pi)
    if kind == "stripes":
        t = (np.cos(a) * xx + np.sin(a) * yy) / period
        return np.where((t % 1.0) < 0.5, 1.05, 0.6).astype(np.float32)
    if kind == "checker":
        u = (np.cos(a) * xx + np.sin(a) * yy) / period
        v = (-np.sin(a) * xx + np.cos(a) * yy) / period
        return np.where(((np.floor(u) + np.floor(v)) % 2) == 0, 1.05, 0.62).astype(np.float32)
    if kind == "dots":
        u = (xx / period) % 1.0 - 0.5
        v = (yy / period) % 1.0 - 0.5
        return np.where(u * u + v * v < 0.09, 0.55, 1.05).astype(np.float32)
    raise ValueError(kind)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation colour clouds, a faint random pattern and grain: ``[h, w, 3]`` in [0, 1]."""
    base = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.85))
    coarse = rng.uniform(-0.18, 0.18, size=(rng.integers(3, 7), rng.integers(3, 7), 3))
    clouds = np.asarray(
        Image.fromarray(((coarse + 0.5) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32
    ) / 255.0 - 0.5
    img = clouds + base[None, None, :]
    # A faint background pattern, so texture alone does not separate object from background.
    # cos(kx x + ky y) as a sum of outer products: two 1-D cosines instead of an h x w one.
    a, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
    kx, ky = 2 * math.pi * math.cos(a) / period, 2 * math.pi * math.sin(a) / period
    xs, ys = np.arange(w, dtype=np.float32) * kx, np.arange(h, dtype=np.float32) * ky
    amp = rng.uniform(0.0, 0.08)
    pattern = np.outer(np.cos(ys), np.cos(xs) * amp) - np.outer(np.sin(ys), np.sin(xs) * amp)
    pattern += rng.standard_normal((h, w), dtype=np.float32) * 0.035  # grain
    img += pattern[..., None]
    return img


def _paste(img: np.ndarray, spec: ClassSpec, cx: float, cy: float, size: int,
           rng: np.random.Generator, textured: bool = True) -> None:
    """Render one object of class ``spec`` centred at (cx, cy) with side ``size`` into ``img``."""
    shape_angle = rng.uniform(-0.5, 0.5) if spec.shape in ("triangle", "bowtie", "crescent") else \
        rng.uniform(0, 2 * math.pi)
    mask = _shape_mask(spec.shape, size, shape_angle, rng.uniform(0.85, 1.18))
    colour = _hsv_to_rgb(spec.hue + rng.normal(0, 9), rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95))
    # Mostly the class texture; sometimes another one, so texture is a cue and not the answer.
    texture = spec.texture if rng.random() < 0.75 else TEXTURES[rng.integers(len(TEXTURES))]
    texture = texture if textured else "solid"
    fill = colour[None, None, :] * _texture(texture, size, rng)[..., None]
    h, w = img.shape[:2]
    x0, y0 = int(round(cx - size / 2)), int(round(cy - size / 2))
    sx0, sy0 = max(0, -x0), max(0, -y0)
    x1, y1 = min(w, x0 + size), min(h, y0 + size)
    if x1 <= max(x0, 0) or y1 <= max(y0, 0):
        return
    m = mask[sy0:sy0 + y1 - max(y0, 0), sx0:sx0 + x1 - max(x0, 0), None]
    f = fill[sy0:sy0 + y1 - max(y0, 0), sx0:sx0 + x1 - max(x0, 0)]
    region = img[max(y0, 0):y1, max(x0, 0):x1]
    region *= 1.0 - m
    region += m * f


@dataclass(frozen=True)
class SceneConfig:
    """Image geometry, clutter and the shapes classes draw from. These defaults give 160..400 px images
    like small natural photos; the demo's own (``tl_fast.demo.DEMO_SCENE``) are smaller, with 4 shapes."""

    min_side: int = 160
    max_side: int = 400
    max_aspect: float = 1.7
    main_scale: tuple[float, float] = (0.32, 0.55)  # main object side / short image side
    distractor_scale: tuple[float, float] = (0.14, 0.28)
    distractors: tuple[int, int] = (2, 4)  # inclusive range
    jpeg_quality: int = 90
    shapes: tuple[str, ...] = SHAPES  # classes cycle through these shapes, then through colour families
    textured: bool = True  # False: objects are filled with their colour alone (no surface texture)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: class, centre and side in pixels; ``main`` for the labelled one."""

    label: int
    cx: float
    cy: float
    size: int
    main: bool


@dataclass(frozen=True)
class SceneLayout:
    """Image size and objects in drawing order (distractors first, the main object last)."""

    width: int
    height: int
    objects: tuple[SceneObject, ...]


def scene_layout(seed: int, split: str, label: int, index: int, num_classes: int,
                 cfg: SceneConfig = SceneConfig()) -> SceneLayout:
    """Where the objects of a scene go. Its own random stream, so it is known without rendering."""
    rng = np.random.default_rng([seed, SPLITS[split], label, index, 0])
    while True:  # image size: each side in [min_side, max_side], aspect bounded
        w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
        if max(w, h) / min(w, h) <= cfg.max_aspect:
            break
    short = min(w, h)
    main_size = int(short * rng.uniform(*cfg.main_scale))
    # Main object anywhere, fully inside the frame.
    mcx = float(rng.uniform(main_size / 2, w - main_size / 2))
    mcy = float(rng.uniform(main_size / 2, h - main_size / 2))
    others = [c for c in range(num_classes) if c != label]
    objects = []
    for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
        other = others[int(rng.integers(len(others)))]
        size = max(12, int(short * rng.uniform(*cfg.distractor_scale)))
        for _try in range(8):  # keep distractor centres off the main object (they may overlap its edge)
            cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
            if max(abs(cx - mcx), abs(cy - mcy)) > 0.5 * (main_size + size) * 0.8:
                break
        objects.append(SceneObject(other, cx, cy, size, False))
    objects.append(SceneObject(label, mcx, mcy, main_size, True))  # drawn last: never hidden
    return SceneLayout(w, h, tuple(objects))


def layout_class_map(layout: SceneLayout, grid: int, background: int | None = None) -> np.ndarray:
    """``[grid, grid]`` class ids of a scene squashed to a square ``grid``: each cell takes the class of
    the topmost object whose square box holds the cell centre, else ``background`` (default: the
    scene's label, so background carries the image's class as context does)."""
    main = next(o.label for o in layout.objects if o.main)
    out = np.full((grid, grid), main if background is None else background, dtype=np.int64)
    centres = (np.arange(grid) + 0.5) / grid
    ys, xs = centres[:, None] * layout.height, centres[None, :] * layout.width
    for o in layout.objects:  # drawing order: later objects are on top
        half = o.size / 2
        out[(np.abs(ys - o.cy) <= half) & (np.abs(xs - o.cx) <= half)] = o.label
    return out


def render_scene(seed: int, split: str, label: int, index: int, specs: list[ClassSpec],
                 cfg: SceneConfig = SceneConfig()) -> bytes:
    """JPEG bytes of one scene whose main object is class ``label``.

    Deterministic in ``(seed, split, label, index)`` and the class list.
    """
    layout = scene_layout(seed, split, label, index, len(specs), cfg)
    rng = np.random.default_rng([seed, SPLITS[split], label, index, 1])  # appearance stream
    img = _background(layout.height, layout.width, rng)
    for obj in layout.objects:
        _paste(img, specs[obj.label], obj.cx, obj.cy, obj.size, rng, cfg.textured)
    out = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue()
