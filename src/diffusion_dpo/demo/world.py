"""The miniature world of `diffusion-dpo demo`: 32x32 RGB images of one coloured shape on a plain background.

A scene is (shape, colour, position, radius, vividness, jitter). The caption names the colour, the
shape and the coarse position ("a red circle at the top left"); the radius (size) and the vividness
of the colour (how saturated/bright the object is: muted grey-ish red ... vivid pure red) are NOT in
the caption and vary uniformly, so a model trained on the world produces them at random. That
uncaptioned variation is what the demo's hidden-taste judge (`demo.judge`) scores.

Prompt split: the world's captions are every (colour, shape, position) combination (5 x 3 x 9 = 135).
`train_prompts()` / `heldout_prompts()` split them by a fixed seeded permutation into disjoint sets
(about 80/20), checked so that every colour, shape and position word occurs in both. The base model
is pretrained on train captions only, so held-out prompts are unseen combinations of seen words.

Everything is deterministic from a seed (numpy Generator); rendering is 4x supersampled then
box-downsampled, so edges are anti-aliased.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4
BACKGROUND = (235, 235, 235)  # plain light grey

SHAPES = ("circle", "square", "triangle")
# name -> vivid RGB; the muted end of each colour is the vivid one mixed half-way with mid grey
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (20, 180, 30),
    "blue": (30, 60, 230),
    "yellow": (235, 205, 0),
    "purple": (150, 30, 200),
}
MUTED_GREY = (120, 120, 120)
# name -> (row, col) in a 3x3 grid; centres at 8, 16, 24 px
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "centre": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
RADIUS_RANGE = (3.5, 7.0)  # half-extent of the shape in pixels (uncaptioned size)
VIVID_RANGE = (0.0, 1.0)  # 0 = muted, 1 = vivid (uncaptioned colour treatment)
JITTER = 1.5  # max position offset in pixels around the grid centre
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    position: str
    radius: float
    vividness: float
    dx: float = 0.0
    dy: float = 0.0

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.position)

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) centre in pixels."""
        row, col = POSITIONS[self.position]
        return 8.0 + 8.0 * col + self.dx, 8.0 + 8.0 * row + self.dy


def caption(color: str, shape: str, position: str) -> str:
    where = "in the centre" if position == "centre" else f"at the {position}"
    return f"a {color} {shape} {where}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, position) of a world caption; raises ValueError for anything else."""
    words = text.strip().lower().split()
    if len(words) < 5 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
        raise ValueError(f"not a demo-world caption: {text!r}")
    if words[3:] == ["in", "the", "centre"]:
        position = "centre"
    elif words[3:5] == ["at", "the"]:
        position = " ".join(words[5:])
    else:
        position = ""
    if position not in POSITIONS:
        raise ValueError(f"not a demo-world caption: {text!r}")
    return words[1], words[2], position


def object_rgb(color: str, vividness: float) -> tuple[float, float, float]:
    vivid = np.array(COLORS[color], dtype=np.float64)
    muted = 0.5 * vivid + 0.5 * np.array(MUTED_GREY, dtype=np.float64)
    return tuple(muted + vividness * (vivid - muted))


def vocabulary() -> list[str]:
    """Every word of every caption (for `models.build.build_clip_tokenizer`)."""
    words = {"a", "at", "the", "in", *SHAPES, *COLORS}
    for pos in POSITIONS:
        words.update(pos.split())
    return sorted(words)


def all_prompts() -> list[str]:
    return [caption(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def _split() -> tuple[list[str], list[str]]:
    prompts = all_prompts()
    rng = np.random.default_rng(SPLIT_SEED)
    n_held = round(HELDOUT_FRACTION * len(prompts))
    for _ in range(1000):  # redraw until every word appears on both sides
        order = rng.permutation(len(prompts))
        held = sorted(prompts[i] for i in order[:n_held])
        train = sorted(prompts[i] for i in order[n_held:])
        seen_train = {parse_caption(p) for p in train}
        ok = all(
            any(t[k] == v for t in seen_train) and any(parse_caption(h)[k] == v for h in held)
            for k, values in ((0, COLORS), (1, SHAPES), (2, POSITIONS)) for v in values
        )
        if ok:
            return train, held
    raise RuntimeError("could not split the demo prompts")  # pragma: no cover


def train_prompts() -> list[str]:
    """The 108 captions the base model (and the demo's DPO/SFT) train on."""
    return _split()[0]


def heldout_prompts() -> list[str]:
    """The 27 captions never used in training (unseen combinations of seen words)."""
    return _split()[1]


def sample_scene(rng: np.random.Generator, prompt: str | None = None) -> Scene:
    """A random scene; with `prompt`, one matching that caption (random size, vividness, jitter)."""
    if prompt is None:
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        position = str(rng.choice(list(POSITIONS)))
    else:
        color, shape, position = parse_caption(prompt)
    radius = float(rng.uniform(*RADIUS_RANGE))
    vividness = float(rng.uniform(*VIVID_RANGE))
    dx, dy = (float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
    return Scene(shape, color, position, radius, vividness, dx, dy)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (size, size) float32. Circle of radius r; square of side 2r;
    upward isosceles triangle with base 2r and height 2r (bounding-box fill 0.5)."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)  # x: column, y: row
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
    elif shape == "square":
        inside = (np.abs(x - cx) <= radius) & (np.abs(y - cy) <= radius)
    elif shape == "triangle":
        top, bottom = cy - radius, cy + radius
        half_width = radius * (y - top) / (2 * radius)  # 0 at the apex, r at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    cover = inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return cover.astype(np.float32)


def render(scene: Scene) -> Image.Image:
    cx, cy = scene.center
    cover = shape_mask(scene.shape, cx, cy, scene.radius)[..., None]
    bg = np.array(BACKGROUND, dtype=np.float32)
    fg = np.array(object_rgb(scene.color, scene.vividness), dtype=np.float32)
    img = bg * (1 - cover) + fg * cover
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def sample_dataset(n: int, seed: int = 0, prompts: list[str] | None = None) -> list[tuple[Image.Image, str, Scene]]:
    """`n` (image, caption, scene) triples, deterministic in `seed`. Captions cycle through `prompts`
    (default: the train prompts) in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    prompts = train_prompts() if prompts is None else list(prompts)
    out = []
    for i in range(n):
        if i % len(prompts) == 0:
            order = rng.permutation(len(prompts))
        scene = sample_scene(rng, prompts[order[i % len(prompts)]])
        out.append((render(scene), scene.caption, scene))
    return out


def hue_of(rgb: tuple[float, float, float]) -> float:
    return colorsys.rgb_to_hsv(*(v / 255.0 for v in rgb))[0]
