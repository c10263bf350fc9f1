"""The shapes world: renderer, prompt grammar, train/val split and the exact judges."""

import itertools
import os
import random

import numpy as np
import pytest
import torch

import shapes_world as W


def scene_batch(category: str, n: int, seed: int) -> tuple[torch.Tensor, list[str], list]:
    rng = random.Random(seed)
    scenes = [W.random_scene(category, rng, split=None) for _ in range(n)]
    images = torch.stack([W.to_tensor(W.render(objects)) for _, objects in scenes])
    return images, [p for p, _ in scenes], [o for _, o in scenes]


@pytest.mark.parametrize("category", W.CATEGORIES)
def test_judges_right_on_clean_renders(category):
    """At least 99% of a few hundred random clean scenes score > 0.9 on their own prompt."""
    images, prompts, _ = scene_batch(category, 200, seed=1)
    scores = W.score(images, prompts, category)
    assert scores.shape == (200,) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (scores > 0.9).float().mean() >= 0.99, scores.min()


def test_judges_reject_wrong_color_and_wrong_shape():
    """A phrase with a color or a shape absent from the scene gets P(yes) < 0.1."""
    images, _, scenes = scene_batch("color", 150, seed=2)
    for image, objects in zip(images, scenes):
        present_colors = {o.color for o in objects}
        present_shapes = {o.shape for o in objects}
        for o in objects:
            assert W.vqa_probability(image, f"{o.color} {o.shape}") > 0.9
            for color in set(W.COLORS) - present_colors:
                assert W.vqa_probability(image, f"{color} {o.shape}") < 0.1
            for shape in set(W.SHAPES) - present_shapes:
                assert W.vqa_probability(image, f"{o.color} {shape}") < 0.1


def test_swapped_binding_scores_low():
    """'a red circle and a blue square' drawn as a blue circle and a red square: the binding error."""
    rng = random.Random(3)
    objects = W.place([("blue", "circle", "solid"), ("red", "square", "solid")], rng)
    image = W.to_tensor(W.render(objects))[None]
    assert W.score(image, ["a red circle and a blue square"], "color")[0] < 0.1
    assert W.score(image, ["a blue circle and a red square"], "color")[0] > 0.9


def test_spatial_judge_flips_with_the_relation():
    rng = random.Random(4)
    objects = W.place(
        [("red", "circle", "solid"), ("blue", "square", "solid")], rng, "on the left of"
    )
    image = W.to_tensor(W.render(objects))[None]
    good = W.score(image, ["a red circle on the left of a blue square"], "spatial")
    bad = W.score(image, ["a red circle on the right of a blue square"], "spatial")
    assert good[0] > 0.9 and bad[0] < 0.1


def test_texture_judge_tells_the_three_textures_apart():
    for texture in W.TEXTURES:
        objects = [W.Obj("green", "square", texture, 32, 32, 14)]
        image = W.to_tensor(W.render(objects))
        for other in W.TEXTURES:
            p = W.vqa_probability(image, f"{other} square")
            assert (p > 0.9) if other == texture else (p < 0.1), (texture, other, p)


def test_texture_judge_reads_where_the_dark_pixels_lie_not_how_many():
    """Textures are read from the pattern's place on the 8 px grid, so every object size gives the right
    texture; a dark share like a stripe's (half the object) that is not in the stripes' rows is solid,
    and a striped pattern shifted by half a period (dark rows where the world has light ones) is not
    striped."""
    for shape, h in itertools.product(W.SHAPES, W.HALF_WIDTH):
        for texture in W.TEXTURES:
            image = W.to_tensor(W.render([W.Obj("blue", shape, texture, 31, 33, h)]))
            for other in W.TEXTURES:
                p = W.vqa_probability(image, f"{other} {shape}")
                assert (p > 0.9) if other == texture else (p < 0.1), (shape, h, texture, other, p)
    half_dark = W.render([W.Obj("red", "square", "solid", 32, 32, 14)])
    half_dark[:, :32] = np.where(half_dark[:, :32] == W.BACKGROUND, half_dark[:, :32],
                                 (half_dark[:, :32] * W.DARK).round())  # fmt: skip
    assert W.vqa_probability(W.to_tensor(half_dark), "solid square") > 0.9
    shifted = W.render([W.Obj("red", "square", "striped", 32, 28, 14)])
    # the object moves down 8 px and its stripes with it: dark rows where the world has light ones
    shifted = np.roll(shifted, W.TEXTURE_CELL, axis=0)
    assert W.vqa_probability(W.to_tensor(shifted), "striped square") < 0.1


def test_judges_degrade_smoothly_under_noise():
    """Scores fall gradually, not all at once, as Gaussian pixel noise grows (generated images are noisy)."""
    images, prompts, _ = scene_batch("color", 40, seed=5)
    generator = torch.Generator().manual_seed(0)
    means = []
    for sigma in (0.0, 0.05, 0.1, 0.15, 0.2):
        noise = torch.randn(images.shape, generator=generator) * sigma
        means.append(W.score((images + noise).clamp(0, 1), prompts, "color").mean().item())
    assert means[0] > 0.9 and means[-1] < means[0]
    steps = [a - b for a, b in itertools.pairwise(means)]
    assert max(steps) < 0.5, means  # no cliff between neighbouring noise levels


def test_empty_image_scores_zero():
    image = W.to_tensor(W.render([]))[None]
    for category, prompt in [
        ("color", "a red circle and a blue square"),
        ("spatial", "a red circle above a blue square"),
    ]:
        assert W.score(image, [prompt], category)[0] == 0


def test_parse_prompt_forms():
    phrases, relation = W.parse_prompt("a red circle on the left of a blue square")
    assert relation == "on the left of"
    assert phrases == [
        {"color": "red", "shape": "circle"},
        {"color": "blue", "shape": "square"},
    ]
    phrases, relation = W.parse_prompt("a striped triangle and a dotted circle")
    assert relation is None and phrases[0] == {
        "texture": "striped",
        "shape": "triangle",
    }
    with pytest.raises(ValueError, match="not part of the shapes world"):
        W.parse_prompt("a red car")


@pytest.mark.parametrize("category", W.CATEGORIES)
def test_prompt_files_match_the_grammar_and_the_split(category):
    """Shipped prompt files equal what the grammar generates, and val phrase sets never occur in train."""
    files = {}
    for split in ("train", "val"):
        with open(os.path.join(W.PROMPT_DIR, f"{category}_{split}.txt")) as f:
            files[split] = f.read().splitlines()
        assert files[split], f"{category}_{split}.txt is empty"
        assert all(W.split_of(p) == split for p in files[split])
    assert sorted(files["train"] + files["val"]) == sorted(W.all_prompts(category))

    def combination(prompt: str) -> frozenset:
        phrases, _ = W.parse_prompt(prompt)
        return frozenset(tuple(sorted(p.items())) for p in phrases)

    train = {combination(p) for p in files["train"]}
    val = {combination(p) for p in files["val"]}
    assert not train & val


def test_training_scenes_never_draw_val_combinations():
    rng = random.Random(6)
    for category in ("color", "shape", "texture", "spatial"):
        for _ in range(50):
            prompt, _ = W.random_scene(category, rng, split="train")
            assert W.split_of(prompt) == "train"


def test_connected_components_counts_blobs():
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 6:9, 5:9] = True
    mask[0, 5, 0] = True
    labels = W.connected_components(mask)
    assert len(labels.unique()) - 1 == 3
    assert (labels[0, 1:3, 1:3] == labels[0, 1, 1]).all()
