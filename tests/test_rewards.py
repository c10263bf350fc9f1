"""Tests of rewards.py, offline on CPU.

Every model-based scorer runs its exact production path (`rewards.load_reward(name, model=FOLDER)`) on a
small randomly initialised model of the real architecture, saved with `save_pretrained` to a tmp folder
together with a tokenizer built here from a tiny vocabulary. Random weights cannot check that a score
is *meaningful*; they check shapes, ranges, batching, precision and the arithmetic against independent
recomputations. Meaning is checked by the real-weight tests at the end, which run only when an
environment variable gives a local path to the real weights and are reported as skipped otherwise.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import loop_utils
import rewards

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------------
# Small models of the real architectures, saved like real checkpoints
# ----------------------------------------------------------------------------------------------------
WORDS = sorted(
    rewards.words(
        "a an the and of on to next near top left right bottom side yes no ? red "
        "green blue white brown bench car backpack bowl clock tablet lamp blanket "
        "balloon giraffe dog cat round square metallic fluffy desk photo circle triangle "
        "striped dotted yellow purple above below"
    )
)
SMALL_LAYERS = {
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 37,
}
# BLIP initialises its vision tower with std 1e-10 and the rest with 0.02: a tiny model so initialised
# gives the same score to every input, and no test could fail. Larger weights make every input count.
BLIP_INIT = 0.5


def save_blip(folder: Path) -> Path:
    """BlipForQuestionAnswering + BlipProcessor (BERT word-piece tokenizer over WORDS, 32 px images)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipProcessor,
    )

    try:  # transformers 5 names the PIL processors *Pil; 4.x has only the PIL one
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    except ImportError:
        from transformers import BlipImageProcessor as BlipImageProcessorPil

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]", "[ENC]"]
    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    (folder / "vocab" / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # from a vocab.txt, as transformers 4.x and 5.x both read it
    tokenizer = BertTokenizer.from_pretrained(folder / "vocab", bos_token="[DEC]")
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    text = dict(
        vocab_size=len(tokens),
        hidden_size=32,
        max_position_embeddings=64,
        **SMALL_LAYERS,
    )
    text.update(
        pad_token_id=0,
        sep_token_id=3,
        bos_token_id=tokens.index("[DEC]"),
        initializer_range=BLIP_INIT,
    )
    vision = dict(
        hidden_size=32,
        image_size=32,
        patch_size=8,
        initializer_range=BLIP_INIT,
        **SMALL_LAYERS,
    )
    config = BlipConfig(text_config=text, vision_config=vision, initializer_range=BLIP_INIT)
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(folder)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer from a vocab.json + merges.txt written here (characters, no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'-":
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def save_clip(folder: Path, projection_dim: int = 16) -> Path:
    """CLIPModel + CLIPProcessor (resize 40 px short side, centre-crop 32 px)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    tokenizer = save_clip_tokenizer(folder / "tokenizer")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        max_position_embeddings=77,
        **SMALL_LAYERS,
    )
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, **SMALL_LAYERS)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_owlv2(folder: Path) -> Path:
    """Owlv2ForObjectDetection + Owlv2Processor (32 px, 4x4 patches = 16 candidate boxes)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor

    try:
        from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    except ImportError:
        from transformers import Owlv2ImageProcessor as Owlv2ImageProcessorPil

    tokenizer = save_clip_tokenizer(folder / "tokenizer")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        max_position_embeddings=40,
        **SMALL_LAYERS,
    )
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, **SMALL_LAYERS)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    ).save_pretrained(folder)
    image_processor = Owlv2ImageProcessorPil(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> str:
    return str(save_blip(tmp_path_factory.mktemp("blip")))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return str(save_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> str:
    return str(save_owlv2(tmp_path_factory.mktemp("owlv2")))


def random_images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# prompts of the shapes world, whose template needs no spaCy (the spaCy path: FakeSpacy below)
PROMPTS = [
    "a green square and a red circle",
    "a blue triangle and a red circle and a white square",
    "a striped circle and a dotted square",
    "a yellow circle",
    "a red circle on the left of a blue square",
    "a green triangle above a white square",
]


def check_batching_and_precision(
    name: str, model: str, prompts=PROMPTS, atol: float = 0.05, **options
):
    """Shapes, dtype, finiteness; batch == one-by-one; bfloat16 close to float32. Returns fp32 scores."""
    images = random_images(len(prompts))
    fp32 = rewards.load_reward(name, model=model, dtype="float32", **options)
    scores = fp32(images, prompts)
    assert (
        scores.shape == (len(prompts),)
        and scores.dtype == torch.float32
        and scores.device.type == "cpu"
    )
    assert torch.isfinite(scores).all()
    assert scores.std() > 1e-3, (
        "the scorer gives every input the same score: the test could not fail"
    )
    one_by_one = torch.cat(
        [fp32(images[i : i + 1], prompts[i : i + 1]) for i in range(len(prompts))]
    )
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-4)
    bf16 = rewards.load_reward(name, model=model, dtype="bfloat16", **options)
    torch.testing.assert_close(bf16(images, prompts), scores, atol=atol, rtol=0)
    return scores


# ----------------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------------
def test_reward_names_and_unknown_name_lists_valid_ones():
    assert set(rewards.REWARD_NAMES) == set(rewards.LOADERS)
    with pytest.raises(ValueError, match="valid rewards: color, shape, texture, spatial"):
        rewards.load_reward("colour")


def test_import_loads_no_model_library():
    code = "import sys, rewards; print(sorted(m for m in ('transformers', 'diffusers', 'PIL') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_bad_inputs_and_dtype_give_clear_errors():
    reward = rewards.load_reward("jpeg_incompressibility")
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(random_images(2), ["a cat"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(torch.rand(2, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="unknown dtype"):
        rewards.resolve_dtype("cpu", "float33")
    assert rewards.resolve_dtype("cpu", None) == torch.float32
    assert rewards.resolve_dtype("cuda", None) == torch.bfloat16
    # "original": the original scorer's precision on CUDA, float32 on the CPU
    assert rewards.resolve_dtype("cuda", "original", original=torch.float16) == torch.float16
    assert rewards.resolve_dtype("cuda", "original") == torch.float32
    assert rewards.resolve_dtype("cpu", "original", original=torch.float16) == torch.float32
    with pytest.raises(ValueError, match="has no option model; its options: quality, dtype"):
        rewards.load_reward("jpeg_compressibility", model="x")


def test_an_ignored_dtype_is_an_error():
    """transformers < 4.56 ignores dtype= and loads float32: bf16 inputs would meet fp32 weights."""

    class Loaded:
        dtype = torch.float32

    class OldLibrary:
        @staticmethod
        def from_pretrained(model, **kwargs):
            return Loaded()

    with pytest.raises(RuntimeError, match="needs transformers>=4.56"):
        rewards.from_pretrained(OldLibrary, "some/model", dtype=torch.bfloat16)
    assert isinstance(rewards.from_pretrained(OldLibrary, "m", dtype=torch.float32), Loaded)


def test_pipeline_dtype_keyword_follows_the_diffusers_version(monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.31.0")
    assert loop_utils.dtype_option(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(diffusers, "__version__", "0.42.1")
    assert loop_utils.dtype_option(torch.float16) == {"dtype": torch.float16}


def test_missing_local_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(RuntimeError, match="pass the folder as the model option"):
        rewards.load_reward("non_spatial", model=str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# JPEG (DDPO)
# ----------------------------------------------------------------------------------------------------
def test_jpeg_size_matches_pil_and_signs():
    from PIL import Image

    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = random_images(1, 64)
    images = torch.cat([flat, noise])
    size = rewards.jpeg_size_kb(images)
    buffer = io.BytesIO()
    array = (noise[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert size[1].item() == pytest.approx(len(buffer.getvalue()) / 1000)
    assert size[0] < size[1]  # a flat image compresses far better than noise
    prompts = ["x", "y"]
    compress = rewards.load_reward("jpeg_compressibility")(images, prompts)
    incompress = rewards.load_reward("jpeg_incompressibility")(images, prompts)
    torch.testing.assert_close(compress, -size)
    torch.testing.assert_close(incompress, size)


# ----------------------------------------------------------------------------------------------------
# BLIP-VQA: the splitter, the yes/no arithmetic, the product, the model path
# ----------------------------------------------------------------------------------------------------
# Noun phrases come from spaCy (not installed by requirements.txt): the tests stand in for its pipeline
# with FakeSpacy, which reads hand-annotated parses; tests/test_rewards_real.py runs the real model.
class FakeToken:
    def __init__(self, text: str, pos: str):
        self.text, self.pos_ = text, pos


class FakeChunk:
    """A noun chunk: text, root token (its last word), character span, length in tokens."""

    def __init__(self, text: str, start: int, root: FakeToken):
        self.text, self.start_char, self.end_char, self.root = text, start, start + len(text), root
        self.size = len(text.split())

    def __len__(self) -> int:
        return self.size


class FakeDoc(list):
    """Tokens (word -> ADJ if listed, PRON if a pronoun, else NOUN) and bracketed noun chunks."""

    ADJECTIVES = rewards.words("red green blue white brown small fluffy wooden yellow")
    PRONOUNS = rewards.words("it them that")

    def __init__(self, annotated: str):
        self.prompt = annotated.replace("[", "").replace("]", "")
        super().__init__(FakeToken(w, self.pos(w)) for w in re.findall(r"\w+|[^\w\s]", self.prompt))
        self.noun_chunks, removed = [], 0
        for match in re.finditer(r"\[([^\]]+)\]", annotated):
            start = match.start() - removed
            root = match.group(1).split()[-1]
            self.noun_chunks.append(
                FakeChunk(match.group(1), start, FakeToken(root, self.pos(root)))
            )
            removed += 2

    def pos(self, word: str) -> str:
        return "ADJ" if word in self.ADJECTIVES else "PRON" if word in self.PRONOUNS else "NOUN"


def fake_spacy(monkeypatch, *annotated: str) -> dict[str, FakeDoc]:
    """Install a stand-in for spaCy's en_core_web_sm that knows these prompts' parses."""
    docs = {doc.prompt: doc for doc in map(FakeDoc, annotated)}
    monkeypatch.setitem(rewards.SPACY, rewards.SPACY_MODEL, docs.__getitem__)
    return docs


@pytest.fixture
def no_spacy(monkeypatch):
    """No spaCy at all: importing it fails, and no pipeline is loaded."""
    monkeypatch.setattr(rewards, "SPACY", {})
    monkeypatch.setitem(sys.modules, "spacy", None)


def test_shapes_world_prompts_need_no_spacy(no_spacy):
    """Every prompt of the world is split by its template into the phrases the world itself reads."""
    import shapes_world as W

    prompts = [p for category in W.CATEGORIES for p in W.all_prompts(category)]
    assert len(prompts) == 1764
    for prompt in prompts:
        phrases, _ = W.parse_prompt(prompt)
        found = rewards.noun_phrases(prompt)
        assert [W.parse_phrase(p.text) for p in found] == phrases
        assert [p.head for p in found] == [p["shape"] for p in phrases]
        assert all(prompt[p.start : p.end] == p.text for p in found)
    assert rewards.blip_questions("A striped red circle above a blue square.") == [
        "a striped red circle?",
        "a blue square?",
    ]
    assert rewards.parse_spatial_prompt("a red circle below a blue square") == (
        "circle",
        "below",
        "square",
    )
    # anything else is not the template: another word, relation, determiner or sentence
    for prompt in (
        "a red circle and a dog",
        "a red circle near a blue square",
        "the red circle",
        "a red circle, a blue square",
        "there is a red circle",
    ):
        assert rewards.shapes_world_phrases(prompt) is None, prompt


def test_missing_spacy_is_a_one_line_error_saying_how_to_install_it(
    no_spacy, blip_dir, owl_dir, monkeypatch
):
    sentence = "A small brown dog slept below a red wooden table."
    for fn in (
        rewards.blip_questions,
        rewards.parse_spatial_prompt,
        rewards.without_attributes,
        lambda p: rewards.load_reward("color", model=blip_dir)(random_images(1), [p]),
        lambda p: rewards.load_reward("spatial", model=owl_dir)(random_images(1), [p]),
    ):
        with pytest.raises(RuntimeError) as error:
            fn(sentence)
        message = str(error.value)
        assert rewards.SPACY_INSTALL in message and "\n" not in message
        assert "pip install spacy && python -m spacy download en_core_web_sm" in message
    # a prompt without a relation word needs no parse for the spatial objects
    assert rewards.parse_spatial_prompt("A small brown dog slept.") is None

    # spaCy without its model: spacy.load raises OSError (E050)
    def load(name):
        raise OSError(f"[E050] Can't find model '{name}'.\nIt doesn't seem to be a Python package.")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    with pytest.raises(
        RuntimeError, match=r"\(\[E050\] Can't find model 'en_core_web_sm'\.\)"
    ) as error:
        rewards.blip_questions(sentence)
    assert "\n" not in str(error.value) and rewards.SPACY_INSTALL in str(error.value)


def test_blip_questions_are_compbench_noun_chunks(monkeypatch):
    """One question per chunk, as BLIP reads it; the exact chunks 'top', 'the side', 'the left',
    'the right' dropped and no others; at most 8."""
    many = " ".join(f"[a{i} b]" for i in range(10))
    fake_spacy(
        monkeypatch,
        "[A small brown dog] slept below [a red wooden table].",
        "[a dog] on [the left] of [The left] [top] [the top] [side] [the side] [Mr. Brown's (cat)]",
        many,
    )
    assert rewards.blip_questions("A small brown dog slept below a red wooden table.") == [
        "a small brown dog?",
        "a red wooden table?",
    ]
    questions = rewards.blip_questions(
        "a dog on the left of The left top the top side the side Mr. Brown's (cat)"
    )
    assert questions == ["a dog?", "the left?", "the top?", "side?", "mr brown's cat?"]
    assert rewards.blip_questions(many.replace("[", "").replace("]", "")) == [
        f"a{i} b?" for i in range(8)
    ]


@pytest.mark.parametrize(
    "annotated, parsed",
    [
        ("[A small brown dog] slept below [a red wooden table].", ("dog", "below", "table")),
        ("[a balloon] on [the top] of [a giraffe]", ("balloon", "on the top of", "giraffe")),
        ("[a dog] on [the left] of [a cat]", ("dog", "on the left of", "cat")),
        ("[The red book] was on [top] of [the wooden table].", ("book", "on top of", "table")),
        ("[The dog] lay next  to [the cat]", ("dog", "next to", "cat")),
        # a lone pronoun is no object: no second object, no relation scored
        ("[The dog] sat next to [it].", None),
        ("[a green bench] and [a red car]", None),
    ],
)
def test_parse_spatial_prompt(monkeypatch, annotated, parsed):
    docs = fake_spacy(monkeypatch, annotated)
    assert rewards.parse_spatial_prompt(next(iter(docs))) == parsed


def test_without_attributes_drops_spacy_adjectives(monkeypatch):
    fake_spacy(monkeypatch, "[The fluffy dog] chased [the white cat].")
    # CompBench joins spaCy's tokens with spaces
    assert (
        rewards.without_attributes("The fluffy dog chased the white cat.")
        == "The dog chased the cat ."
    )


def test_yes_probability_arithmetic():
    vocab = 6
    yes_id, no_id = 2, 4
    probs = torch.tensor([[0.1, 0.05, 0.6, 0.03, 0.2, 0.02], [0.2, 0.2, 0.1, 0.1, 0.3, 0.1]])
    logits = probs.log() + 3.0  # any shift of the logits leaves probabilities unchanged
    # p(yes) / (p(yes) + p(no)) = 0.6 / 0.8 and 0.1 / 0.4
    expected = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(rewards.yes_probability(logits, yes_id, no_id), expected)
    raw = rewards.yes_probability(logits, yes_id, no_id, normalise=False)
    torch.testing.assert_close(raw, probs[:, yes_id])
    assert logits.shape == (2, vocab)


def test_product_over_phrases():
    p_yes = torch.tensor([0.5, 0.4, 0.9, 0.2, 1.0, 0.3])
    scores = rewards.product_over_phrases(p_yes, [2, 1, 3])
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.9, 0.06]))


def test_blip_vqa_batching_precision_and_range(blip_dir):
    # BLIP_INIT's large random weights make mid-range scores chaotic: bfloat16 rounding moved them by
    # up to 0.28 over 8 image seeds (0.08 on these images), with these prompts as with sentences
    scores = check_batching_and_precision("color", blip_dir, atol=0.3)
    assert ((scores > 0) & (scores < 1)).all()


def test_blip_vqa_is_the_product_over_phrase_questions(blip_dir):
    """score("A and B") == score("A") * score("B") on the same image, through the whole path."""
    reward = rewards.load_reward("texture", model=blip_dir)
    image = random_images(1)
    images = image.expand(3, -1, -1, -1)
    both, first, second = reward(
        images, ["a red circle and a green square", "a red circle", "a green square"]
    )
    torch.testing.assert_close(both, first * second, atol=1e-6, rtol=1e-5)


def test_blip_first_answer_logits_match_transformers_generate(blip_dir):
    """With [CLS] kept, our first-step logits equal BlipForQuestionAnswering.generate's own."""
    from transformers import AutoProcessor, BlipForQuestionAnswering

    processor = AutoProcessor.from_pretrained(blip_dir)
    net = BlipForQuestionAnswering.from_pretrained(blip_dir).eval()
    image = random_images(1, 32)
    pixels = rewards.model_pixels(image, *rewards.processor_geometry(processor.image_processor))
    tokens = processor.tokenizer(["a red car?"], return_tensors="pt")
    with torch.no_grad():
        reference = net.generate(
            input_ids=tokens.input_ids,
            pixel_values=pixels,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        ).logits[0]
        embeds = net.vision_model(pixel_values=pixels).last_hidden_state
        ours = rewards.first_answer_logits(net, tokens.input_ids, embeds, enc_id=None)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_blip_options_change_the_computation(blip_dir):
    images, prompts = random_images(2), PROMPTS[:2]
    enc = rewards.load_reward("color", model=blip_dir)(images, prompts)
    cls = rewards.load_reward("color", model=blip_dir, first_token="cls")(images, prompts)
    assert not torch.allclose(enc, cls)  # the [ENC] token is really written
    raw = rewards.load_reward("color", model=blip_dir, normalise=False)(images, prompts)
    assert (raw < enc).all()  # vocabulary-wide p(yes) < p(yes) renormalised over {yes, no}
    bigger = rewards.load_reward("color", model=blip_dir, image_size=48)(images, prompts)
    assert bigger.shape == (2,) and not torch.allclose(bigger, enc)
    with pytest.raises(ValueError, match="first_token"):
        rewards.load_reward("color", model=blip_dir, first_token="sep")


def test_torch_preprocessing_matches_the_processors(blip_dir, clip_dir):
    """Our on-device resize/crop/normalise stays close to the transformers PIL processors."""
    from PIL import Image
    from transformers import AutoProcessor

    smooth = torch.nn.functional.interpolate(random_images(1, 6), size=(48, 56), mode="bilinear")
    array = (smooth[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    for folder in (blip_dir, clip_dir):
        processor = AutoProcessor.from_pretrained(folder).image_processor
        reference = processor(images=Image.fromarray(array), return_tensors="pt").pixel_values
        ours = rewards.model_pixels(image, *rewards.processor_geometry(processor))
        assert ours.shape == reference.shape
        # normalised units (std ~0.27): 0.05 is ~0.013 in [0, 1] pixel units, resampling differences only
        torch.testing.assert_close(ours, reference, atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------
# spatial: the rule (exact) and the detector path (random OWLv2)
# ----------------------------------------------------------------------------------------------------
def box(cx: float, cy: float, half: float = 0.1) -> torch.Tensor:
    return torch.tensor([cx - half, cy - half, cx + half, cy + half])


def test_relation_score_follows_compbench_rule():
    left, right, up, down = box(0.2, 0.5), box(0.8, 0.5), box(0.5, 0.2), box(0.5, 0.8)
    assert rewards.relation_score("on the left of", left, right) == 1.0
    assert rewards.relation_score("on the left of", right, left) == 0.0
    assert rewards.relation_score("on the right of", right, left) == 1.0
    assert rewards.relation_score("on the top of", up, down) == 1.0  # y grows downwards
    assert rewards.relation_score("on top of", up, down) == 1.0
    assert rewards.relation_score("on the bottom of", down, up) == 1.0
    assert rewards.relation_score("on the left of", up, down) == 0.0  # vertical axis dominates
    # overlapping boxes: iou = 1/3 -> iou_threshold / iou = 0.3
    a, b = torch.tensor([0.0, 0.0, 0.4, 0.4]), torch.tensor([0.2, 0.0, 0.6, 0.4])
    assert rewards.relation_score("on the left of", a, b) == pytest.approx(0.3)
    # "next to": close on either axis -> 1, else distance / max(|dx|, |dy|)
    assert rewards.relation_score("next to", left, right) == 1.0
    far = rewards.relation_score("near", box(0.1, 0.1), box(0.9, 0.9))
    # CompBench's 150 px are on UniDet's 479 px input: 150/479 of the image side
    assert far == pytest.approx((150 / 479) / 0.8)
    near = rewards.relation_score("near", box(0.2, 0.2), box(0.2 + 0.31, 0.2 + 0.31))
    assert near == 1.0  # 0.31 < 150/479 = 0.313 (it would be > 150/512 = 0.293)
    # strict: CompBench's "on top of" has no rule and scores no position
    assert rewards.relation_score("on top of", up, down, strict=True) == 0.0
    assert rewards.relation_score("on the top of", up, down, strict=True) == 1.0


def test_spatial_rule_combination_and_threshold():
    left, right = box(0.2, 0.5), box(0.8, 0.5)
    # 0.25 * 0.8 + 0.25 * 0.6 + 0.5 * 1 = 0.85
    assert rewards.spatial_rule("on the left of", [(0.8, left), (0.6, right)]) == pytest.approx(
        0.85
    )
    assert rewards.spatial_rule("on the right of", [(0.8, left), (0.6, right)]) == 0.0  # 0.35 < 0.5
    assert rewards.spatial_rule("on the left of", [(0.9, left), None]) == 0.0  # 0.225 < 0.5


def corners(*centres: tuple[float, float], half: float = 0.1) -> torch.Tensor:
    return torch.stack([box(cx, cy, half) for cx, cy in centres])


def test_two_objects_are_two_detections():
    """An image with one object: both queries' best patch is that object; it must count only once."""
    # patches 0 and 1 cover the same dog (IoU 0.68), patch 2 is background far away
    boxes = torch.cat([corners((0.2, 0.2)), corners((0.22, 0.2)), corners((0.9, 0.9))])
    confidence = torch.tensor([[0.9, 0.6], [0.8, 0.5], [0.05, 0.2]])  # (P, 2): "dog", "cat"
    dog, cat = rewards.two_detections(boxes, confidence, 0.1, [True, True])
    assert dog[0] == pytest.approx(0.9) and torch.equal(dog[1], boxes[0])
    assert cat[0] == pytest.approx(0.2) and torch.equal(cat[1], boxes[2])  # not the dog's box
    # one box for both would score 0.25 * 0.9 + 0.25 * 0.6 + 0.5 = 0.875 on "next to"; now 0
    assert rewards.spatial_rule("next to", [dog, cat]) == 0.0
    assert rewards.two_detections(boxes, confidence, 0.3, [True, True])[1] is None
    # the more confident query chooses first, whichever of the two it is
    swapped = rewards.two_detections(boxes, confidence.flip(1), 0.1, [True, True])
    assert swapped[1][0] == pytest.approx(0.9) and swapped[0][0] == pytest.approx(0.2)
    # strict mode: a query without a UniDet label is never found
    assert rewards.two_detections(boxes, confidence, 0.1, [True, False])[1] is None


def test_spatial_strict_labels(owl_dir, tmp_path, monkeypatch):
    annotated = [
        "[a dog] next to [a cat]",
        "[a man] next to [a cat]",
        "[a dog] next to [a giraffe]",
    ]
    prompts = list(fake_spacy(monkeypatch, *annotated))
    images = random_images(3)
    loose = rewards.load_reward("spatial", model=owl_dir, box_threshold=0.0)(images, prompts)
    assert (loose > 0).all()
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\nperson\n")
    strict = rewards.load_reward("spatial", model=owl_dir, box_threshold=0.0, labels=str(labels))
    scores = strict(images, prompts)
    # "man" is UniDet's "person"; "giraffe" is no label: one object found -> 0.25 c < 0.5 -> 0
    torch.testing.assert_close(scores[:2], loose[:2])
    assert scores[2] == 0.0
    torch.save(
        {"labels": ["dog", "cat", "person"], "features": torch.zeros(3, 2)}, tmp_path / "f.pt"
    )
    from_pt = rewards.load_reward(
        "spatial", model=owl_dir, box_threshold=0.0, labels=str(tmp_path / "f.pt")
    )
    torch.testing.assert_close(from_pt(images, prompts), scores)
    with pytest.raises(FileNotFoundError, match="one UniDet label per line"):
        rewards.load_reward("spatial", model=owl_dir, labels=str(tmp_path / "missing.txt"))


def test_spatial_detector_path(owl_dir, monkeypatch):
    # "next to" scores a position on any two boxes; the four axes often score 0 on random boxes
    prompts = PROMPTS[4:] + list(
        fake_spacy(
            monkeypatch,
            "[a balloon] on [the top] of [a giraffe]",
            "[a dog] next to [a cat]",
            "[a red car] on [the right] of [a bench]",
        )
    )
    scores = check_batching_and_precision("spatial", owl_dir, prompts, box_threshold=0.0)
    assert ((scores == 0) | ((scores >= 0.5) & (scores <= 1))).all()
    no_relation = rewards.load_reward("spatial", model=owl_dir)(random_images(1), ["a red circle"])
    assert no_relation.item() == 0.0


# ----------------------------------------------------------------------------------------------------
# CLIP: non_spatial and clipscore; complex
# ----------------------------------------------------------------------------------------------------
def test_clip_cosine_matches_clipmodel_forward(clip_dir):
    from transformers import AutoProcessor, CLIPModel

    scores = check_batching_and_precision("non_spatial", clip_dir, atol=0.02)
    processor = AutoProcessor.from_pretrained(clip_dir)
    net = CLIPModel.from_pretrained(clip_dir).eval()
    images = random_images(len(PROMPTS))
    pixels = rewards.model_pixels(images, *rewards.processor_geometry(processor.image_processor))
    tokens = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = net(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=pixels,
        )
    # logits_per_image = exp(logit_scale) * cos -> the diagonal pairs image i with prompt i
    expected = out.logits_per_image.diagonal() / net.logit_scale.exp()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    clipscore = rewards.load_reward("clipscore", model=clip_dir, prefix="")(images, PROMPTS)
    torch.testing.assert_close(clipscore, 2.5 * scores.clamp(min=0))


def test_clipscore_prefixes_a_photo_depicts(clip_dir):
    images = random_images(2)
    cosine = rewards.load_reward("non_spatial", model=clip_dir)
    expected = 2.5 * cosine(images, ["A photo depicts a red car", "A photo depicts a dog"]).clamp(
        min=0
    )
    clipscore = rewards.load_reward("clipscore", model=clip_dir)(images, ["a red car", "a dog"])
    torch.testing.assert_close(clipscore, expected)


def fake_scorer(values: dict[str, float], calls: list):
    """A loader whose reward returns values[prompt] and records the prompts it was asked about."""

    def loader(device="cpu", **options):
        def reward(images, prompts):
            calls.append(list(prompts))
            return torch.tensor([values[p] for p in prompts])

        return reward

    return loader


def test_complex_routes_with_compbench_lists(tmp_path, monkeypatch):
    """With the lists: spatial -> (a + s) / 2, action -> (a + c) / 2, neither -> (a + s + c) / 3."""
    spatial_p, action_p, both_p = fake_spacy(
        monkeypatch,
        "[The red cup] was on [the left] of [the blue bowl].",
        "[The brown dog] chased [the white cat].",
        "[The green car] was parked next to [the yellow house].",
    )
    (tmp_path / "complex_val_spatial.txt").write_text(spatial_p + "\n")
    (tmp_path / "complex_val_action.txt").write_text(action_p + "\n")
    prompts = [spatial_p, action_p, both_p]
    calls = {"a": [], "s": [], "c": []}
    a = dict(zip(prompts, [0.2, 0.4, 0.6]))
    s = dict(zip(prompts, [0.8, 0.0, 0.9]))
    c = {rewards.without_attributes(p): v for p, v in zip(prompts, [0.0, 0.3, 0.15])}
    monkeypatch.setattr(rewards, "load_blip_vqa", fake_scorer(a, calls["a"]))
    monkeypatch.setattr(rewards, "load_spatial", fake_scorer(s, calls["s"]))
    monkeypatch.setattr(rewards, "load_clip_cosine", fake_scorer(c, calls["c"]))
    reward = rewards.load_reward("complex", lists=str(tmp_path))
    scores = reward(random_images(3), prompts)
    expected = torch.tensor([(0.2 + 0.8) / 2, (0.4 + 0.3) / 2, (0.6 + 0.9 + 0.15) / 3])
    torch.testing.assert_close(scores, expected)
    # only the branches a prompt needs are computed
    assert calls["s"] == [[spatial_p, both_p]]
    assert calls["c"] == [[rewards.without_attributes(p) for p in (action_p, both_p)]]
    # without the lists: relation word -> spatial, else action; never 3-way
    assert [rewards.complex_route(p, None) for p in prompts] == ["spatial", "action", "spatial"]
    with pytest.raises(FileNotFoundError, match="complex_\\*_spatial.txt"):
        rewards.load_reward("complex", lists=str(tmp_path / "nowhere"))


def test_complex_averages_attribute_with_spatial_or_action(
    blip_dir, owl_dir, clip_dir, monkeypatch
):
    annotated = [
        "[The red car] was on [the left] of [the bench]",
        "[a fluffy dog] and [a white cat]",
    ]
    prompts = list(fake_spacy(monkeypatch, *annotated))
    images = random_images(2)
    score = rewards.load_reward(
        "complex", blip_model=blip_dir, detector_model=owl_dir, clip_model=clip_dir
    )(images, prompts)
    attribute = rewards.load_reward("color", model=blip_dir)(images, prompts)
    spatial = rewards.load_reward("spatial", model=owl_dir)(images[:1], prompts[:1])
    action = rewards.load_reward("non_spatial", model=clip_dir)(images[1:], ["a dog and a cat"])
    torch.testing.assert_close(score, (attribute + torch.cat([spatial, action])) / 2)
    assert rewards.without_attributes("a fluffy dog and a white cat") == "a dog and a cat"


# ----------------------------------------------------------------------------------------------------
# aesthetic: LAION predictor v2 head on CLIP ViT-L/14 embeddings
# ----------------------------------------------------------------------------------------------------
def test_aesthetic_head_layer_sizes_and_state_dict_keys():
    head = rewards.aesthetic_head()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "0.weight": (1024, 768),
        "2.weight": (128, 1024),
        "4.weight": (64, 128),
        "6.weight": (16, 64),
        "7.weight": (1, 16),
    }


def test_aesthetic_path(tmp_path):
    clip_dir = str(save_clip(tmp_path / "clip", projection_dim=768))
    torch.manual_seed(1)
    head = rewards.aesthetic_head().eval()
    with torch.no_grad():
        head[0].weight.mul_(
            30
        )  # inputs are unit vectors: without this every image scores about the same
    # saved the way upstream saved it: the MLP module's state dict, keys "layers.0.weight", ...
    upstream = {f"layers.{k}": v for k, v in head.state_dict().items()}
    torch.save(upstream, tmp_path / "head.pth")
    reward_options = {"head": str(tmp_path / "head.pth")}
    scores = check_batching_and_precision("aesthetic", clip_dir, atol=0.02, **reward_options)
    # independent recomputation: MLP(e / |e|)
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(clip_dir)
    net = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = rewards.model_pixels(
        random_images(len(PROMPTS)),
        *rewards.processor_geometry(processor.image_processor),
    )
    with torch.no_grad():
        e = rewards.image_features(net.get_image_features(pixel_values=pixels))
        expected = head(torch.nn.functional.normalize(e, dim=-1)).squeeze(1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_aesthetic_head_offline_error_says_how_to_provide_it(tmp_path):
    with pytest.raises(RuntimeError, match="pass its path: load_reward\\('aesthetic', head="):
        rewards.fetch_aesthetic_head(url="http://127.0.0.1:9/head.pth", cache_dir=str(tmp_path))
    cached = tmp_path / "loop" / "head.pth"
    cached.write_bytes(b"x")  # a cached file is used without any download
    assert (
        rewards.fetch_aesthetic_head(url="http://127.0.0.1:9/head.pth", cache_dir=str(tmp_path))
        == cached
    )


# ----------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------
def test_load_prompts(tmp_path):
    (tmp_path / "color_train.txt").write_text(
        "a green bench and a red car\n\n  a blue bowl and a red cup \n"
    )
    (tmp_path / "color_val.txt").write_text("\n")
    assert rewards.load_prompts(tmp_path, "color", "train") == [
        "a green bench and a red car",
        "a blue bowl and a red cup",
    ]
    with pytest.raises(ValueError, match="is empty; write one prompt per line"):
        rewards.load_prompts(tmp_path, "color", "val")
    with pytest.raises(FileNotFoundError, match="shape_train.txt not found.*T2I-CompBench"):
        rewards.load_prompts(tmp_path, "shape", "train")
    with pytest.raises(ValueError, match="split must be"):
        rewards.load_prompts(tmp_path, "color", "test")


# ----------------------------------------------------------------------------------------------------
# The prepared real-weights check runs end to end (here on the small random BLIP)
# ----------------------------------------------------------------------------------------------------
def test_blip_size_check_script_runs(blip_dir, tmp_path):
    from PIL import Image

    samples = tmp_path / "samples"
    samples.mkdir()
    prompts = ["a red circle", "a green square and a red circle", "a white triangle"]
    for index, prompt in enumerate(prompts):
        array = (random_images(1, 40, seed=index)[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(samples / f"{prompt}_{index}.png")
    answers = [{"question_id": k, "answer": f"{0.3 * k:.4f}"} for k in range(3)]
    (tmp_path / "vqa_result.json").write_text(json.dumps(answers))
    command = [sys.executable, "bench/blip_size_check.py", "--samples", str(samples)]
    command += ["--compbench", str(tmp_path / "vqa_result.json"), "--blip_model", blip_dir]
    command += ["--sizes", "32", "48", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 images; CompBench's mean 0.3000" in run.stdout
    assert "32 px: mean" in run.stdout and "48 px: mean" in run.stdout


def test_prompt_files_are_read_as_utf8_with_or_without_a_byte_order_mark(tmp_path):
    """Editors on Windows save UTF-8 with a byte-order mark: it is no part of the first prompt."""
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffa red circle and a blue square\r\na café table\r\n".encode())
    assert rewards.read_prompt_file(path) == ["a red circle and a blue square", "a café table"]
    path.write_bytes("a caf\xe9 table\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        rewards.read_prompt_file(path)
