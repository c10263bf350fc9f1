"""The shapes world: a procedurally drawn scene world with exact pixel-level judges.

No machine of ours can download Stable Diffusion or BLIP, so the project owns a small world where the whole
method runs offline on a CPU, attribute binding is hard for the base model, and every image is judged
exactly, from pixels. This file is the world's definition: anyone can re-implement a renderer or a judge
from the constants and rules below.

The world (fixed)
- Images 64x64 RGB on a uniform background BACKGROUND = (24, 24, 24).
- Colors (exact RGB) in COLORS; shapes circle, square, triangle (pointing up), half-width 9..15 px;
  objects never overlap (bounding boxes at least GAP px apart).
- Textures, drawn in absolute image coordinates on the 8x8 pixel cells that one latent of an 8x-per-side
  VAE covers (Stable Diffusion's factor: the shipped models' 8x8x4 latents), so a latent can carry them:
    solid    every pixel of the object has its color;
    striped  horizontal bands 8 px high: rows with (y // 8) odd take the dark shade (color * DARK);
    dotted   dark 4x4 dots on an 8 px grid: pixels with x % 8 < 4 and y % 8 < 4 take the dark shade.
  The dark shade keeps an object one connected blob of its own hue, so color judging ignores texture.

Prompt forms and categories (mirroring T2I-CompBench's attribute binding + spatial)
    single    "a {color} {shape}"                                   (used to train the base model)
    color     "a {color} {shape} and a {color} {shape}"             two different colors
    shape     "a {color} {shape} and a {color} {shape}"             two different shapes
    texture   "a {texture} {shape} and a {texture} {shape}"         two different textures, colors free
    spatial   "a {color} {shape} {relation} a {color} {shape}"      relation in RELATIONS
A "noun phrase" is "{color} {shape}" or "{texture} {shape}" (or "{texture} {color} {shape}").

Splits: for every category, each *set of (attribute, object) phrases* of a prompt is assigned to train
or val by a fixed hash, so a val prompt's attribute-object combination never appears in train
(`split_of`). Prompt files: shapes_world/prompts/{category}_{train,val}.txt, written by `write_prompt_files`.

The judges (the world's "VQA model", all from pixels)
1. A 3x3 median filter removes pixel noise; foreground = pixels whose L1 distance to BACKGROUND exceeds
   FG_THRESHOLD; 4-connected components of at least MIN_AREA pixels are objects.
2. Per object: p(color c) = fraction of its pixels whose nearest palette entry (full or dark shade) is c;
   p(shape s) = softmax over shapes of IoU(mask, ideal shape s of the same area and centroid) / temperature;
   p(texture t) from where the dark-shade pixels of the unfiltered image lie: the dark share inside a
   texture's pattern minus the share outside it, over the object's pixels (a "contrast", 1 for a clean
   render of that texture, about 0 for the other two), so it does not depend on the object's size.
3. P(yes | image, "<phrase>?") = max over objects of the product of that phrase's attribute
   probabilities (an object-presence factor included).
4. color / shape / texture score = product over the prompt's phrases (T2I-CompBench's BLIP-VQA rule);
   spatial score = the two phrases found on two distinct objects and the relation holding between their
   centres (T2I-CompBench's detector rule: the relation's axis must dominate), smoothed by a logistic.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# The world's constants
# ----------------------------------------------------------------------------------------------------
SIZE = 64  # image side in pixels
BACKGROUND = (24, 24, 24)
COLORS = {
    "red": (220, 40, 40),
    "yellow": (235, 215, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("solid", "striped", "dotted")
RELATIONS = ("on the left of", "on the right of", "above", "below")
CATEGORIES = ("color", "shape", "texture", "spatial")
HALF_WIDTH = (9, 15)  # inclusive range of an object's half-width in pixels
GAP = 3  # minimum empty pixels between two objects' bounding boxes
DARK = 0.5  # the dark shade of a texture is color * DARK
TEXTURE_CELL = 8  # px: a stripe's height, a dot's grid; one latent cell of an 8x-per-side VAE
FG_THRESHOLD = 48  # L1 distance to BACKGROUND (0..765) above which a pixel is foreground
MIN_AREA = 24  # components smaller than this are specks, not objects
RELATION_MARGIN = 8  # when drawing a spatial scene, |along| - |across| >= this (px)
VAL_FRACTION = 0.25  # share of phrase combinations held out for validation
PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


@dataclass(frozen=True)
class Obj:
    """One object of a scene: its attributes and its placement (centre cx, cy and half-width h, px)."""

    color: str
    shape: str
    texture: str
    cx: int
    cy: int
    h: int


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------
def shape_mask(shape: str, cx: int, cy: int, h: int, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at (cx, cy) with half-width h."""
    y, x = np.mgrid[0:size, 0:size]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= h * h + h  # "+ h" rounds the rim like a rasterised circle
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex at (cx, cy - h), base row at cy + h spanning cx - h..cx + h
        inside_rows = (dy >= -h) & (dy <= h)
        half_span = (dy + h) / 2.0  # grows from 0 at the apex to h at the base
        return inside_rows & (np.abs(dx) <= half_span + 0.5)
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def texture_mask(texture: str, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size) mask of the pixels that take the dark shade for this texture."""
    y, x = np.mgrid[0:size, 0:size]
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    if texture == "striped":
        return (y // TEXTURE_CELL) % 2 == 1
    if texture == "dotted":
        return (x % TEXTURE_CELL < TEXTURE_CELL // 2) & (y % TEXTURE_CELL < TEXTURE_CELL // 2)
    raise ValueError(f"unknown texture {texture!r}; valid: {TEXTURES}")


def render(objects: list[Obj], size: int = SIZE) -> np.ndarray:
    """Render a scene to a uint8 (size, size, 3) image."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for o in objects:
        mask = shape_mask(o.shape, o.cx, o.cy, o.h, size)
        color = np.array(COLORS[o.color], dtype=np.float32)
        dark = texture_mask(o.texture, size) & mask
        image[mask] = color.astype(np.uint8)
        image[dark] = (color * DARK).round().astype(np.uint8)
    return image


# ----------------------------------------------------------------------------------------------------
# Prompts: parsing, generation and the train / val split
# ----------------------------------------------------------------------------------------------------
def phrase_text(o: Obj, with_color: bool = True, with_texture: bool = False) -> str:
    """The noun phrase naming an object, e.g. "red circle", "striped circle", "striped red circle"."""
    words = ([o.texture] if with_texture else []) + ([o.color] if with_color else []) + [o.shape]
    return " ".join(words)


def parse_phrase(phrase: str) -> dict[str, str]:
    """'striped red circle' -> {'texture': 'striped', 'color': 'red', 'shape': 'circle'}."""
    attributes = {}
    for word in phrase.split():
        if word in COLORS:
            attributes["color"] = word
        elif word in SHAPES:
            attributes["shape"] = word
        elif word in TEXTURES:
            attributes["texture"] = word
        elif word not in ("a", "an"):
            raise ValueError(f"word {word!r} in phrase {phrase!r} is not part of the shapes world")
    if "shape" not in attributes:
        raise ValueError(f"phrase {phrase!r} names no shape (one of {SHAPES})")
    return attributes


def parse_prompt(prompt: str) -> tuple[list[dict[str, str]], str | None]:
    """Split a prompt into its noun phrases and its spatial relation (None for 'and' / single prompts)."""
    text = prompt.strip().lower().rstrip(".")
    for relation in RELATIONS:
        marker = f" {relation} "
        if marker in text:
            left, right = text.split(marker, 1)
            return [parse_phrase(left), parse_phrase(right)], relation
    return [parse_phrase(part) for part in text.split(" and ")], None


def prompt_for(objects: list[Obj], category: str, relation: str | None = None) -> str:
    """The prompt of a category describing these objects (texture prompts name textures, not colors)."""
    texture = category == "texture"
    phrases = [f"a {phrase_text(o, with_color=not texture, with_texture=texture)}" for o in objects]
    if category == "spatial":
        return f"{phrases[0]} {relation} {phrases[1]}"
    return " and ".join(phrases)


def split_of(prompt: str) -> str:
    """'train' or 'val': a fixed hash of the prompt's *unordered set of phrases* (relation excluded).

    Hashing the unordered set means "a red circle and a blue square" and "a blue square and a red circle"
    (and every relation between them) fall in the same split, so no val combination is seen in training.
    """
    phrases, _ = parse_prompt(prompt)
    key = "|".join(sorted(" ".join(f"{k}={v}" for k, v in sorted(p.items())) for p in phrases))
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < VAL_FRACTION else "train"


def all_prompts(category: str) -> list[str]:
    """Every prompt of a category, in a fixed order."""
    combos = list(itertools.product(COLORS, SHAPES))
    prompts = []
    if category in ("color", "shape", "spatial"):
        for (c1, s1), (c2, s2) in itertools.permutations(combos, 2):
            if category == "color" and c1 == c2:
                continue
            if category == "shape" and s1 == s2:
                continue
            if category == "spatial":
                prompts += [f"a {c1} {s1} {r} a {c2} {s2}" for r in RELATIONS]
            else:
                prompts.append(f"a {c1} {s1} and a {c2} {s2}")
    elif category == "texture":
        for (t1, s1), (t2, s2) in itertools.permutations(itertools.product(TEXTURES, SHAPES), 2):
            if t1 != t2:
                prompts.append(f"a {t1} {s1} and a {t2} {s2}")
    else:
        raise ValueError(f"unknown category {category!r}; valid: {CATEGORIES}")
    return prompts


def write_prompt_files(folder: str = PROMPT_DIR) -> dict[str, int]:
    """Write {category}_{train,val}.txt for every category; returns the line count of each file."""
    os.makedirs(folder, exist_ok=True)
    counts = {}
    for category in CATEGORIES:
        prompts = all_prompts(category)
        for split in ("train", "val"):
            lines = [p for p in prompts if split_of(p) == split]
            with open(os.path.join(folder, f"{category}_{split}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
            counts[f"{category}_{split}"] = len(lines)
    return counts


# ----------------------------------------------------------------------------------------------------
# Random scenes (for training the base model and for testing the judges)
# ----------------------------------------------------------------------------------------------------
def _boxes_apart(a: Obj, b: Obj) -> bool:
    return abs(a.cx - b.cx) > a.h + b.h + GAP or abs(a.cy - b.cy) > a.h + b.h + GAP


def _relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    """Placement rule for drawing spatial scenes: the relation's axis dominates by RELATION_MARGIN px."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # + means b is right of / below a
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; valid: {RELATIONS}")
    along = {"on the left of": dx, "on the right of": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy) if relation in ("on the left of", "on the right of") else abs(dx)
    return along > 0 and along - across >= RELATION_MARGIN


def place(
    attributes: list[tuple[str, str, str]],
    rng: random.Random,
    relation: str | None = None,
) -> list[Obj]:
    """Place objects with these (color, shape, texture) at random, non-overlapping, inside the image."""
    for _ in range(1000):
        objects = []
        for color, shape, texture in attributes:
            h = rng.randint(*HALF_WIDTH)
            objects.append(
                Obj(
                    color,
                    shape,
                    texture,
                    rng.randint(h, SIZE - 1 - h),
                    rng.randint(h, SIZE - 1 - h),
                    h,
                )
            )
        if len(objects) == 2 and not _boxes_apart(*objects):
            continue
        if relation is not None and not _relation_holds(objects[0], objects[1], relation):
            continue
        return objects
    raise RuntimeError(f"could not place {attributes} with relation {relation!r}")


def random_scene(
    category: str, rng: random.Random, split: str | None = "train"
) -> tuple[str, list[Obj]]:
    """A random (prompt, objects) pair of a category ('single' too); `split` restricts the prompt's split."""
    while True:
        colors = rng.sample(list(COLORS), 2)
        shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
        textures = ["solid", "solid"]
        relation = None
        if category == "single":
            textures = [rng.choice(TEXTURES)]
            objects = place([(colors[0], shapes[0], textures[0])], rng)
            return (
                f"a {phrase_text(objects[0], with_texture=textures[0] != 'solid')}",
                objects,
            )
        if category == "color":
            colors[1] = rng.choice([c for c in COLORS if c != colors[0]])
        elif category == "shape":
            colors = [rng.choice(list(COLORS)), rng.choice(list(COLORS))]
            shapes = rng.sample(SHAPES, 2)
        elif category == "texture":
            colors = [rng.choice(list(COLORS)), rng.choice(list(COLORS))]
            textures = rng.sample(TEXTURES, 2)
        elif category == "spatial":
            relation = rng.choice(RELATIONS)
            if (colors[0], shapes[0]) == (colors[1], shapes[1]):
                continue
        else:
            raise ValueError(
                f"unknown category {category!r}; valid: single, {', '.join(CATEGORIES)}"
            )
        objects = place(list(zip(colors, shapes, textures)), rng, relation)
        prompt = prompt_for(objects, category, relation)
        if split is None or split_of(prompt) == split:
            return prompt, objects


# ----------------------------------------------------------------------------------------------------
# The judges
# ----------------------------------------------------------------------------------------------------
# Palette: the full and the dark shade of every color, (2 * n_colors, 3); PALETTE_COLOR maps a row to its color.
PALETTE = torch.tensor(
    [COLORS[c] for c in COLORS] + [[v * DARK for v in COLORS[c]] for c in COLORS]
)
PALETTE_COLOR = list(COLORS) * 2
PALETTE_IS_DARK = torch.tensor([False] * len(COLORS) + [True] * len(COLORS))
SHAPE_TEMPERATURE = 0.03  # softmax temperature over template IoUs


def connected_components(foreground: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of a boolean (N, H, W) mask: (N, H, W) int64, 0 = background.

    Labels propagate the maximum pixel index through each component until nothing changes
    (at most one pass per pixel of the longest path; ~tens of passes for our blobs).
    """
    n, h, w = foreground.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w).expand(n, 1, h, w)
    labels = torch.where(foreground.unsqueeze(1), index, torch.zeros(()))  # (N, 1, H, W)
    fg = foreground.unsqueeze(1)
    while True:
        padded = torch.nn.functional.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack(
            [
                labels,
                padded[..., :-2, 1:-1],
                padded[..., 2:, 1:-1],
                padded[..., 1:-1, :-2],
                padded[..., 1:-1, 2:],
            ]
        )
        new = torch.where(fg, neighbours.amax(0), torch.zeros(()))
        if torch.equal(new, labels):
            return labels.squeeze(1).long()
        labels = new


@dataclass
class Detection:
    """One object found by the judge: attribute probabilities, centre (x, y) and area in pixels."""

    p_color: dict[str, float]
    p_shape: dict[str, float]
    p_texture: dict[str, float]
    cx: float
    cy: float
    area: int


def _shape_probabilities(mask: torch.Tensor) -> dict[str, float]:
    """p(shape): how well the object's mask overlaps each ideal shape of the same area and centroid.

    Each template is the world's shape placed so that its area and centroid match the mask's (a triangle's
    centroid lies h/3 below its centre); IoU with a template is robust to frayed or noisy edges, unlike
    bounding-box features.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    area, cx, cy = len(ys), xs.float().mean().item(), ys.float().mean().item()
    size = mask.shape[-1]
    grid_y, grid_x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dx, dy = grid_x - cx, grid_y - cy
    # same area A:  circle r = sqrt(A / pi);  square (2h)^2 = A;  triangle (2h)^2 / 2 = A
    r, h_square, h_triangle = (area / math.pi) ** 0.5, area**0.5 / 2, (area / 2) ** 0.5
    dy_triangle = dy + h_triangle / 3  # from the triangle's centroid to its bbox centre
    templates = {
        "circle": dx**2 + dy**2 <= r * r,
        "square": (dx.abs() <= h_square) & (dy.abs() <= h_square),
        "triangle": (dy_triangle.abs() <= h_triangle)
        & (dx.abs() <= (dy_triangle + h_triangle) / 2),
    }
    iou = torch.tensor([(t & mask).sum() / (t | mask).sum() for t in templates.values()])
    # p(shape) = softmax(IoU(mask, template_shape) / temperature)
    return dict(zip(templates, torch.softmax(iou / SHAPE_TEMPERATURE, 0).tolist()))


def median_filter(image: torch.Tensor) -> torch.Tensor:
    """3x3 median of each channel, (3, H, W) -> (3, H, W): removes pixel noise, keeps edges."""
    padded = torch.nn.functional.pad(image[None], (1, 1, 1, 1), mode="replicate")
    patches = torch.nn.functional.unfold(padded, 3).view(3, 9, *image.shape[1:])  # (3, 9, H, W)
    return patches.median(dim=1).values


TEXTURE_LEVEL, TEXTURE_SCALE = 0.3, 0.05  # contrast at which p(patterned) = 1/2; logistic scale


def pattern_contrast(dark: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> float:
    """Dark share of the object's pixels inside a texture's pattern minus the share outside it (0 if the
    object has no pixel on one side): 1 for a clean render of that texture, ~0 for solid or the other."""
    inside, outside = dark[mask & pattern], dark[mask & ~pattern]
    if len(inside) == 0 or len(outside) == 0:
        return 0.0
    return inside.float().mean().item() - outside.float().mean().item()


def _texture_probabilities(striped: float, dotted: float) -> dict[str, float]:
    """p(texture) from the stripe and dot contrasts: patterned if either is high, then the higher wins."""
    # p(not solid) = sigmoid((max(c_striped, c_dotted) - 0.3) / 0.05)
    not_solid = torch.sigmoid(torch.tensor((max(striped, dotted) - TEXTURE_LEVEL) / TEXTURE_SCALE))
    # p(striped | not solid) = sigmoid((c_striped - c_dotted) / 0.05)
    p_striped = torch.sigmoid(torch.tensor((striped - dotted) / TEXTURE_SCALE))
    not_solid, p_striped = not_solid.item(), p_striped.item()
    return {
        "solid": 1 - not_solid,
        "striped": not_solid * p_striped,
        "dotted": not_solid * (1 - p_striped),
    }


def detect(image: torch.Tensor) -> list[Detection]:
    """All objects of one image (3, H, W) in [0, 1], largest first."""
    # segment, color and shape on the median-filtered image; texture on the raw pixels (the filter
    # would fray the dots' corners)
    pixels = median_filter(image.float()).permute(1, 2, 0) * 255  # (H, W, 3)
    raw = image.float().permute(1, 2, 0) * 255  # (H, W, 3)
    foreground = (pixels - torch.tensor(BACKGROUND)).abs().sum(-1) > FG_THRESHOLD  # (H, W)
    labels = connected_components(foreground[None])[0]
    nearest = torch.cdist(pixels.view(-1, 3), PALETTE.float()).argmin(-1).view(labels.shape)
    nearest_raw = torch.cdist(raw.reshape(-1, 3), PALETTE.float()).argmin(-1).view(labels.shape)
    dark = PALETTE_IS_DARK[nearest_raw]  # (H, W): the pixel's nearest palette entry is a dark shade
    stripes = torch.from_numpy(texture_mask("striped", labels.shape[-1]))
    dots = torch.from_numpy(texture_mask("dotted", labels.shape[-1]))
    detections = []
    for label in labels.unique()[1:]:
        mask = labels == label
        area = int(mask.sum())
        if area < MIN_AREA:
            continue
        entries = nearest[mask]
        p_color = {c: 0.0 for c in COLORS}
        for entry, count in zip(*entries.unique(return_counts=True)):
            p_color[PALETTE_COLOR[entry]] += count.item() / area
        ys, xs = torch.nonzero(mask, as_tuple=True)
        detections.append(
            Detection(
                p_color,
                _shape_probabilities(mask),
                _texture_probabilities(
                    pattern_contrast(dark, mask, stripes), pattern_contrast(dark, mask, dots)
                ),
                xs.float().mean().item(),
                ys.float().mean().item(),
                area,
            )
        )
    return sorted(detections, key=lambda d: -d.area)


def phrase_probability(detection: Detection, phrase: dict[str, str]) -> float:
    """P(the object matches the phrase) = p(present) * prod over the phrase's attributes of p(attribute)."""
    # p(present) = sigmoid((area - 2 * MIN_AREA) / MIN_AREA): a speck is not an object
    p = torch.sigmoid(torch.tensor((detection.area - 2 * MIN_AREA) / MIN_AREA)).item()
    p *= detection.p_shape[phrase["shape"]]
    if "color" in phrase:
        p *= detection.p_color[phrase["color"]]
    if "texture" in phrase:
        p *= detection.p_texture[phrase["texture"]]
    return p


def relation_probability(a: Detection, b: Detection, relation: str) -> float:
    """P(a <relation> b) from centres: the relation's axis must dominate; logistic, 1.5 px scale."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # + means b is right of / below a
    along = {"on the left of": dx, "on the right of": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy) if relation in ("on the left of", "on the right of") else abs(dx)
    # p = sigmoid(along / 1.5) * sigmoid((along - across) / 1.5): the right side, the dominant axis
    p_side = torch.sigmoid(torch.tensor(along / 1.5))
    return (p_side * torch.sigmoid(torch.tensor((along - across) / 1.5))).item()


def vqa_probability(image: torch.Tensor, phrase: str) -> float:
    """P(yes | image, "<phrase>?"): the best-matching object's phrase probability (0 if none)."""
    attributes = parse_phrase(phrase)
    return max((phrase_probability(d, attributes) for d in detect(image)), default=0.0)


def score_one(image: torch.Tensor, prompt: str, category: str) -> float:
    """One image's category score in [0, 1] (see the module docstring for the rules)."""
    phrases, relation = parse_prompt(prompt)
    detections = detect(image)
    if category in ("color", "shape", "texture"):
        # score = prod over phrases of P(yes | image, "<phrase>?")   (T2I-CompBench's BLIP-VQA rule)
        score = 1.0
        for phrase in phrases:
            score *= max((phrase_probability(d, phrase) for d in detections), default=0.0)
        return score
    if category == "spatial":
        if relation is None or len(phrases) != 2:
            raise ValueError(
                f"spatial prompt {prompt!r} needs the form 'a <phrase> <relation> a <phrase>'"
            )
        # best pair of distinct objects: P(a is phrase 1) * P(b is phrase 2) * P(a relation b)
        pairs = itertools.permutations(detections, 2)
        return max(
            (
                phrase_probability(a, phrases[0])
                * phrase_probability(b, phrases[1])
                * relation_probability(a, b, relation)
                for a, b in pairs
            ),
            default=0.0,
        )
    raise ValueError(f"unknown category {category!r}; valid: {CATEGORIES}")


def score(images: torch.Tensor, prompts: list[str], category: str) -> torch.Tensor:
    """Category scores of a batch: images (N, 3, H, W) in [0, 1], N prompts -> float32 (N,) in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(
            f"expected images (N, 3, H, W) and N prompts, got {tuple(images.shape)} and {len(prompts)}"
        )
    images = images.detach().float().cpu().clamp(0, 1)
    return torch.tensor(
        [score_one(im, p, category) for im, p in zip(images, prompts)],
        dtype=torch.float32,
    )


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


if __name__ == "__main__":
    print(write_prompt_files())
