"""Reward functions r(x_0, c) for LOOP, and a T2I-CompBench-style evaluation command.

Every reward shares one interface, the one the trainer calls:

    reward_fn = rewards.load_reward(name, device="cuda", **options)
    scores = reward_fn(images, prompts)   # images (N, 3, H, W) float in [0, 1], N prompts -> (N,) float32, CPU

Models are loaded once per `load_reward` call, never at import. Every model id is an option (`model=...`)
and a local folder works the same as a hub id, which is how the tests run each scorer's exact code path on
small randomly initialised models of the same architectures.

Scorers (name -> what it computes, default model)
    color, shape, texture   T2I-CompBench BLIP-VQA: product over the prompt's noun phrases (spaCy's
                            noun chunks, gap 5) of P(yes | image, "<phrase>?"),
                            Salesforce/blip-vqa-capfilt-large
    spatial                 APPROXIMATION of T2I-CompBench's UniDet rule on an open-vocabulary detector
                            (UniDet/detectron2 has no transformers port), google/owlv2-base-patch16-ensemble
    non_spatial             T2I-CompBench CLIPScore: raw cosine(image, prompt), openai/clip-vit-base-patch32
    complex                 T2I-CompBench 3-in-1: mean of the attribute score and the spatial and/or
                            action scores (routing in gap 8)
    aesthetic               LAION aesthetic predictor v2 as DDPO uses it: MLP head on the L2-normalised
                            openai/clip-vit-large-patch14 image embedding
    jpeg_compressibility    DDPO: -(JPEG size at quality 95, in kB)
    jpeg_incompressibility  DDPO: +(JPEG size at quality 95, in kB)
    clipscore               CLIPScore (Hessel et al. 2021): 2.5 * max(cos(image, "A photo depicts " +
                            prompt), 0), openai/clip-vit-base-patch32
    shapes_color, shapes_shape, shapes_texture, shapes_spatial
                            the shapes world's exact pixel judges (shapes_world.score)

Precision. `dtype=None` (the training default) runs the models in bfloat16 on CUDA; `dtype="original"`
(the default of `bench/evaluate.py`) runs each as its original does on CUDA: BLIP, CLIP ViT-L/14
(aesthetic) and OWLv2 in float32, CLIP ViT-B/32 (non_spatial, clipscore, complex's action) in
float16. bfloat16 moves CLIP cosines by about as much as published models differ: compare evaluation
numbers only at "original". On the CPU everything runs in float32 unless a dtype is given.

Known gaps with T2I-CompBench's original code, and how they are handled
1. BLIP question's first token. The original BLIP VQA replaces the question's first token ([CLS]) with
   [ENC] before the text encoder; transformers' BlipForQuestionAnswering feeds [CLS]. We write [ENC] by
   default (`first_token="enc"`; its id is the tokenizer's "[ENC]", else BLIP's [DEC] id + 1, the order
   BLIP adds them in), since that is the input the checkpoint was fine-tuned with. `first_token="cls"`
   gives transformers' behaviour.
2. BLIP input size. CompBench runs the VQA checkpoint at 480 px; the transformers conversion of
   blip-vqa-capfilt-large is configured for 384 px (position embeddings interpolated once, at
   conversion). We default to the converted 384 px; `image_size=480` re-interpolates the position
   embeddings (`interpolate_pos_encoding`) to approximate the original input size. Which is closer to
   CompBench's own numbers needs real weights and a GPU: bench/blip_size_check.py (not yet run).
3. Yes probability: p(yes) / (p(yes) + p(no)) from the first decoder step, which is what CompBench's
   modified BLIP computes (`vqa_prob`: softmax over the vocabulary, then yes / (yes + no)).
   `normalise=False` returns the vocabulary-wide softmax p(yes) instead. CompBench also rounds each
   answer and the product to 4 decimals for its files; we do not round.
4. Question padding. The original batches questions padded to the longest and masks the padding (the
   text encoder's attention mask and the decoder's cross-attention mask). transformers 5.x's BLIP text
   cross-attention drops that mask (found by our batching test), so a padded batch would change the
   scores. We never pad: questions of equal token length are batched together, which equals the
   original's masked computation, whatever the library version. Questions are truncated to 35 tokens,
   as in the original.
5. Noun phrases. CompBench asks one question per spaCy en_core_web_sm noun chunk, at most 8, less
   the exact chunks "top", "the side", "the left", "the right" (it does ask "the top?"), normalised
   as BLIP reads it (`blip_question`). We do the same (`noun_phrases`), so the BLIP, spatial and
   complex rewards need spaCy and its model (not in requirements.txt: the model is not on PyPI; a
   one-line error says how to install them, `SPACY_INSTALL`). Shapes-world prompts need neither:
   their template gives spaCy's chunks on all 1,764 of them (`shapes_world_phrases`; tested where
   the model is installed). A prompt without any noun phrase is asked as a whole (CompBench: 1).
6. Image preprocessing runs in torch on the reward's device (resize with antialiasing, centre crop,
   normalise with the processor's mean/std), not in PIL on the CPU; the tests bound the difference.
7. spatial: UniDet (detectron2, 479 px input, detections above confidence 0.5) is replaced by OWLv2
   text queries "a photo of a {noun}" and their sigmoid scores (`box_threshold`, default 0.1: OWLv2's
   confidences are lower than UniDet's). The two objects are always two different detections (never
   one box for both: `two_detections`). The rule on top (centres, IoU, thresholds, the 0.25 + 0.25 +
   0.5 combination, zero below 0.5) is CompBench's, with its 150 px distance on UniDet's 479 px input
   (150/479 of the image side). The objects are the head nouns of the noun phrases on either side of
   the relation (`parse_spatial_prompt`): the roots of spaCy's noun chunks, where CompBench takes
   the first and last NOUN tokens (spatial) or the NOUN tokens nearest the relation (complex); they
   differ on compound nouns ("a desk lamp": CompBench looks for "desk"). Two differences in meaning:
   (a) UniDet finds a noun only if it equals one of its label strings ("girl", "boy", "man", "woman"
   read as "person"): a third of CompBench's spatial val prompts name an object outside that list and
   score 0 in the original whatever the image; OWLv2 finds any noun. (b) CompBench's "on top of" has no
   rule and scores no position; we read it as "on the top of". `labels=FILE` (UniDet's label list)
   is the strict mode that reproduces both, for comparisons with published numbers. Even then the
   detector differs, so scores are NOT comparable with published UniDet numbers.
8. complex: CompBench's 3-in-1 scores the prompts of its complex_*_spatial.txt list (attribute +
   spatial) / 2, of its complex_*_action.txt list (attribute + CLIP on the prompt without adjectives)
   / 2, and every other prompt (its spatialaction list) as the mean of all three. `lists=FOLDER` (and
   `bench/evaluate.py` when the prompt file's folder has the lists) routes exactly so. Without the
   lists a prompt with a relation word is routed spatial and any other action, never 3-way: of the
   300 complex_val prompts that routes 102 spatial (the lists' 58 spatial and 30 three-way, and 14
   they route action) and 198 action (all action in the lists too). Only the branches a prompt needs
   are computed. The action branch's prompt is the original's: spaCy's tokens less its ADJ ones.
"""

from __future__ import annotations

import inspect
import io
import itertools
import os
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]

BLIP_VQA_MODEL = "Salesforce/blip-vqa-capfilt-large"
OWLV2_MODEL = "google/owlv2-base-patch16-ensemble"
CLIP_B32_MODEL = "openai/clip-vit-base-patch32"
CLIP_L14_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)

COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")


# === Shared helpers: inputs, dtype, loading, preprocessing
def check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    """Raise a clear error unless images is (N, 3, H, W) and there are N prompts."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image"
        )


def resolve_dtype(
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    original: torch.dtype = torch.float32,
) -> torch.dtype:
    """The precision a scorer runs in (float32 on the CPU unless a dtype is given).

    None       -> bfloat16 on CUDA: fast, for training rewards.
    "original" -> on CUDA the precision the original scorer runs in (`original`): for evaluation.
    "bfloat16", torch.float16, ... -> that dtype.
    """
    cuda = torch.device(device).type == "cuda"
    if dtype is None:
        return torch.bfloat16 if cuda else torch.float32
    if dtype == "original":
        return original if cuda else torch.float32
    value = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if isinstance(value, torch.dtype):
        return value
    raise ValueError(f"unknown dtype {dtype!r}; use original, float32, bfloat16 or float16")


def from_pretrained(cls, model: str, **kwargs):
    """cls.from_pretrained(model) with a clear error when the weights are neither local nor reachable."""
    if os.path.isdir(model):
        kwargs["local_files_only"] = True
    try:
        loaded = cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as error:  # missing files: hub/offline, or AutoProcessor's
        raise RuntimeError(
            f"could not load {cls.__name__} weights from {model!r} ({error}). Without internet access, "
            f"download them elsewhere (e.g. `huggingface-cli download {model} --local-dir DIR`) and pass "
            f"the folder as the model option (model=DIR), or point HF_HOME at a cache that holds them."
        ) from error
    # transformers < 4.56 ignores `dtype=` (it read `torch_dtype=`): fail instead of mixing precisions
    dtype = kwargs.get("dtype")
    if dtype is not None and getattr(loaded, "dtype", dtype) != dtype:
        import transformers

        raise RuntimeError(
            f"{cls.__name__}.from_pretrained loaded {loaded.dtype} weights when asked for {dtype}: "
            f"transformers {transformers.__version__} ignores dtype=. rewards.py needs "
            "transformers>=4.56: pip install -U 'transformers>=4.56'"
        )
    return loaded


def model_pixels(
    images: torch.Tensor,
    size: int,
    mean: list[float],
    std: list[float],
    crop: int | None = None,
    mode: str = "bicubic",
    pad_value: float | None = None,
) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> normalised model input, as the transformers processors compute it.

    crop None: resize to (size, size) (BLIP, OWLv2) -> (N, 3, size, size).
    crop c:    resize the short side to `size`, centre-crop c x c (CLIP) -> (N, 3, c, c).
    pad_value: first pad bottom/right to a square with this value (OWLv2).
    """
    if pad_value is not None:
        side = max(images.shape[-2:])
        pad = (0, side - images.shape[-1], 0, side - images.shape[-2])
        images = F.pad(images, pad, value=pad_value)
    height, width = images.shape[-2:]
    new_size = (size, size)
    if crop:  # the short side becomes `size`, the long side keeps the aspect ratio (floored, as transformers)
        long = int(size * max(height, width) / min(height, width))
        new_size = (size, long) if height <= width else (long, size)
    x = F.interpolate(images, size=new_size, mode=mode, antialias=True, align_corners=False)
    crop = crop or size
    top, left = (new_size[0] - crop) // 2, (new_size[1] - crop) // 2
    x = x[..., top : top + crop, left : left + crop].clamp(0, 1)  # (N, 3, crop, crop)
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def processor_geometry(processor) -> tuple[int, list[float], list[float], int | None]:
    """(resize px, mean, std, crop px or None) of a transformers image processor: `model_pixels`' arguments."""
    resize = processor.size.get("shortest_edge") or processor.size.get("height")
    crop = processor.crop_size["height"] if getattr(processor, "do_center_crop", False) else None
    return int(resize), list(processor.image_mean), list(processor.image_std), crop


def image_features(output) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor in older transformers, a pooled output in v5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# === JPEG (DDPO): file size at quality 95
def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) JPEG size in kB (1 kB = 1000 bytes) of the 8-bit images."""
    from PIL import Image

    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def load_jpeg(sign: float) -> Callable[..., RewardFn]:
    """Loader of r = sign * JPEG size; device and dtype are accepted for the common interface."""

    def loader(device="cpu", quality: Annotated[int, "[1, 100]"] = 95, dtype=None) -> RewardFn:
        def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            check_inputs(images, prompts)
            # r = -size (compressibility) or +size (incompressibility)
            return sign * jpeg_size_kb(images, quality)

        return reward

    return loader


# === BLIP-VQA (T2I-CompBench attribute binding): noun phrases, yes/no arithmetic, product
def words(text: str) -> set[str]:
    """The set of the space-separated words of `text`."""
    return set(text.split())


# CompBench drops these exact (case-sensitive) noun chunks before asking its questions.
COMPBENCH_DROPPED_CHUNKS = ("top", "the side", "the left", "the right")
COMPBENCH_MAX_PHRASES = 8  # BLIP_vqa.py's --np_num: chunks after the 8th are never asked
SPACY_MODEL = "en_core_web_sm"  # the spaCy pipeline CompBench parses its prompts with
SPACY_INSTALL = "pip install spacy && python -m spacy download en_core_web_sm"
SPACY: dict = {}  # spaCy pipelines by name, loaded on first use


@dataclass
class Phrase:
    """A noun phrase of a prompt: a spaCy noun chunk, or a phrase of the shapes world's template."""

    text: str  # as written in the prompt: "A small brown dog"
    head: str | None  # its noun, lowercased: "dog" (None: a pronoun, which names no object)
    start: int  # prompt[start:end] == text
    end: int


def spacy_pipeline(name: str = SPACY_MODEL):
    """spaCy's pipeline `name`, loaded once; a one-line error saying how to install it if missing."""
    if name not in SPACY:
        try:
            import spacy

            SPACY[name] = spacy.load(name)
        except (ImportError, OSError) as error:  # no spaCy, or no such pipeline (spaCy's E050)
            reason = str(error).splitlines()[0]
            raise RuntimeError(
                f"the BLIP, spatial and complex rewards find a prompt's noun phrases with spaCy's "
                f"{name}, as T2I-CompBench does ({reason}); install them: {SPACY_INSTALL}"
            ) from None
    return SPACY[name]


def shapes_world_phrases(prompt: str) -> list[Phrase] | None:
    """The phrases of a prompt of the shapes world's template, else None: these need no spaCy.

    "a striped red circle above a blue square" -> "a striped red circle", "a blue square": phrases
    "a(n) {texture|color}* {shape}" joined by " and " or one of the world's relations, nothing else.
    """
    import shapes_world as world

    attribute, shape = "|".join([*world.TEXTURES, *world.COLORS]), "|".join(world.SHAPES)
    pattern = rf"\ban? (?:(?:{attribute}) )*({shape})\b"
    found = list(re.finditer(pattern, prompt, flags=re.IGNORECASE))
    joins = {" and ", *(f" {relation} " for relation in world.RELATIONS)}
    gaps = [prompt[a.end() : b.start()].lower() for a, b in itertools.pairwise(found)]
    if not found or any(gap not in joins for gap in gaps):
        return None
    if prompt[: found[0].start()].strip() or prompt[found[-1].end() :].strip() not in ("", "."):
        return None
    return [Phrase(m.group(0), m.group(1).lower(), m.start(), m.end()) for m in found]


def noun_phrases(prompt: str, spacy_model: str = SPACY_MODEL) -> list[Phrase]:
    """The prompt's noun phrases, in order: spaCy's noun chunks (shapes-world prompts: the template).

    "A small brown dog slept below a red wooden table." -> "A small brown dog", "a red wooden table"
    """
    phrases = shapes_world_phrases(prompt)
    if phrases is not None:
        return phrases
    chunks = list(spacy_pipeline(spacy_model)(prompt).noun_chunks)
    # a chunk's head is its root token; a lone pronoun ("it", "that") names no object (the tagger
    # also calls some nouns PRON: "the yellow bookshelf")
    lone_pronoun = [len(c) == 1 and c.root.pos_ == "PRON" for c in chunks]
    heads = [None if pron else c.root.text.lower() for c, pron in zip(chunks, lone_pronoun)]
    return [Phrase(c.text, h, c.start_char, c.end_char) for c, h in zip(chunks, heads)]


def blip_question(phrase: str) -> str:
    """ "The red car" -> "the red car?": CompBench's question, normalised as its BLIP reads it."""
    # f"{phrase}?", then BLIP's pre_question: lowercase, drop . ! " ( ) * # : ; ~, strip trailing spaces
    return re.sub(r'[.!"()*#:;~]', "", f"{phrase}?".lower()).rstrip(" ")


def blip_questions(prompt: str, spacy_model: str = SPACY_MODEL) -> list[str]:
    """The questions the BLIP-VQA score asks about `prompt`, as CompBench: one per noun chunk, at
    most 8, less its dropped chunks ([] if none)."""
    phrases = [p.text for p in noun_phrases(prompt, spacy_model)]
    kept = [p for p in phrases if p not in COMPBENCH_DROPPED_CHUNKS][:COMPBENCH_MAX_PHRASES]
    return [blip_question(phrase) for phrase in kept]


def yes_probability(
    first_step_logits: torch.Tensor, yes_id: int, no_id: int, normalise: bool = True
) -> torch.Tensor:
    """(M, V) logits of the first answer token -> (M,) P(yes).

    normalise: p(yes) / (p(yes) + p(no)) = softmax over the pair {yes, no}; else softmax over the vocabulary.
    """
    logits = first_step_logits.float()
    if normalise:
        pair = logits[:, [yes_id, no_id]]  # (M, V) -> (M, 2)
        return pair.softmax(dim=-1)[:, 0]
    return logits.softmax(dim=-1)[:, yes_id]


def product_over_phrases(p_yes: torch.Tensor, phrase_counts: list[int]) -> torch.Tensor:
    """(sum(counts),) per-question P(yes), grouped by prompt -> (N,) score_i = prod_j P(yes | phrase_ij)."""
    return torch.stack([group.prod() for group in torch.split(p_yes, phrase_counts)])


def question_token_id(tokenizer, config, first_token: str) -> int | None:
    """Id written over the question's first token: [ENC] (original BLIP) or None (keep [CLS])."""
    if first_token == "cls":
        return None
    if first_token != "enc":
        raise ValueError(f"first_token must be 'enc' or 'cls', got {first_token!r}")
    vocab = tokenizer.get_vocab()
    # BLIP's tokenizer adds [DEC] (bos) and then [ENC], so [ENC] = [DEC] + 1 when the tokenizer lacks it.
    enc_id = vocab.get("[ENC]", config.text_config.bos_token_id + 1)
    if enc_id >= config.text_config.vocab_size:
        raise ValueError(f"[ENC] id {enc_id} is outside the text vocabulary; use first_token='cls'")
    return enc_id


def load_blip_vqa(
    device: str | torch.device = "cpu",
    model: str = BLIP_VQA_MODEL,
    dtype: str | torch.dtype | None = None,
    first_token: str = "enc",
    image_size: int | None = None,
    normalise: bool = True,
    spacy_model: str = SPACY_MODEL,
    batch_size: int = 64,
) -> RewardFn:
    """T2I-CompBench BLIP-VQA score: prod over noun phrases of P(yes | image, "<phrase>?").

    spacy_model: the spaCy pipeline that finds the noun phrases (gap 5).
    """
    from transformers import AutoProcessor, BlipForQuestionAnswering

    dtype = resolve_dtype(device, dtype)
    processor = from_pretrained(AutoProcessor, model)
    net = from_pretrained(BlipForQuestionAnswering, model, dtype=dtype).to(device).eval()
    tokenizer = processor.tokenizer
    yes_id, no_id = tokenizer.convert_tokens_to_ids(["yes", "no"])
    if tokenizer.unk_token_id in (yes_id, no_id):
        raise ValueError(f"the tokenizer of {model!r} has no single 'yes'/'no' tokens")
    enc_id = question_token_id(tokenizer, net.config, first_token)
    native_size, mean, std, _ = processor_geometry(processor.image_processor)
    size = image_size or native_size

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        # a prompt without any phrase is asked as a whole, so it can never score a free 1.0 (gap 5)
        unique = {p: blip_questions(p, spacy_model) or [blip_question(p)] for p in set(prompts)}
        asked = [unique[p] for p in prompts]
        questions = [(i, question) for i, qs in enumerate(asked) for question in qs]
        pixels = model_pixels(images.to(device, torch.float32), size, mean, std)
        # each image is encoded once: (N, 3, S, S) -> (N, P, D)
        image_embeds = net.vision_model(
            pixel_values=pixels.to(dtype), interpolate_pos_encoding=size != native_size
        ).last_hidden_state
        logits = answer_logits(net, tokenizer, image_embeds, questions, enc_id, batch_size)
        p_yes = yes_probability(logits, yes_id, no_id, normalise)  # (Q,)
        return product_over_phrases(p_yes, [len(qs) for qs in asked])

    return reward


def answer_logits(net, tokenizer, image_embeds, questions, enc_id, batch_size) -> torch.Tensor:
    """(Q, V) first-answer-token logits of Q (image index, question) pairs, on the CPU.

    image_embeds (N, P, D); questions [(index into image_embeds, question)]; enc_id as from
    `question_token_id`. Questions of equal token length are batched together, never padded (gap 4).
    """
    # BLIP truncates its questions to 35 tokens
    token_ids = tokenizer([q for _, q in questions], truncation=True, max_length=35)["input_ids"]
    logits = [None] * len(questions)
    for chunk in equal_length_chunks(token_ids, batch_size):
        input_ids = torch.tensor([token_ids[j] for j in chunk], device=image_embeds.device)
        images = image_embeds[[questions[j][0] for j in chunk]]  # (M, P, D)
        chunk_logits = first_answer_logits(net, input_ids, images, enc_id).float().cpu()
        for j, row in zip(chunk, chunk_logits, strict=True):
            logits[j] = row
    return torch.stack(logits)


def equal_length_chunks(token_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of the sequences grouped by length, in chunks of at most batch_size."""
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(token_ids):
        by_length.setdefault(len(ids), []).append(index)
    return [
        group[i : i + batch_size]
        for group in by_length.values()
        for i in range(0, len(group), batch_size)
    ]


def first_answer_logits(
    net, input_ids: torch.Tensor, image_embeds: torch.Tensor, enc_id: int | None
) -> torch.Tensor:
    """Logits (M, V) of the answer's first token for M unpadded questions (M, L) and image embeddings (M, P, D)."""
    if enc_id is not None:
        input_ids = input_ids.clone()
        input_ids[:, 0] = enc_id  # [CLS] -> [ENC], as the original BLIP VQA (gap 1)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    unmasked = {"attention_mask": torch.ones_like(input_ids), "encoder_attention_mask": image_mask}
    encoded = net.text_encoder(input_ids=input_ids, encoder_hidden_states=image_embeds, **unmasked)
    question = encoded.last_hidden_state  # (M, L, D)
    bos = torch.full((len(input_ids), 1), net.decoder_start_token_id, device=input_ids.device)
    mask = torch.ones_like(input_ids)  # the decoder attends to every question token
    answer = net.text_decoder(
        input_ids=bos, encoder_hidden_states=question, encoder_attention_mask=mask
    )
    return answer.logits[:, -1, :]  # (M, 1, V) -> (M, V)


# === spatial: T2I-CompBench's UniDet rule on OWLv2 detections (an APPROXIMATION, see gap 7)
# CompBench's relation vocabulary, in its search order ("above"/"below" added for the shapes world).
SPATIAL_RELATIONS = ("on side of", "next to", "near", "on the left of", "on the right of")
SPATIAL_RELATIONS += ("on the bottom of", "on the top of", "on top of", "above", "below")
RELATION_AXIS = {
    "on top of": "on the top of",
    "above": "on the top of",
    "below": "on the bottom of",
}
NOT_OBJECTS = words("top side left right bottom")  # "the left" of "on the left of" is no object


def parse_spatial_prompt(
    prompt: str, spacy_model: str = SPACY_MODEL
) -> tuple[str, str, str] | None:
    """ "a balloon on the top of a giraffe" -> ("balloon", "on the top of", "giraffe"); None if no relation.

    The objects are the heads of the last noun phrase before the relation and of the first one after
    it (`noun_phrases`), so a verb before the relation ("the dog slept below") is never an object.
    Only a prompt with a relation word is parsed.
    """
    phrases = None
    for relation in SPATIAL_RELATIONS:
        pattern = r"\b" + r"\s+".join(relation.split()) + r"\b"  # "next to", "next  to", ...
        match = re.search(pattern, prompt, flags=re.IGNORECASE)
        if match:
            phrases = noun_phrases(prompt, spacy_model) if phrases is None else phrases
            objects = [p for p in phrases if p.head and p.head not in NOT_OBJECTS]
            before = [p.head for p in objects if p.end <= match.start()]
            after = [p.head for p in objects if p.start >= match.end()]
            if before and after:
                return before[-1], relation, after[0]
    return None


def relation_score(
    relation: str,
    box1: torch.Tensor,
    box2: torch.Tensor,
    iou_threshold: float = 0.1,
    distance: float = 150 / 479,
    strict: bool = False,
) -> float:
    """CompBench's soft position score of object 1 `relation` object 2; boxes (x0, y0, x1, y1), y down.

    distance: CompBench's 150 px on UniDet's 479 px input, as a fraction of the image side.
    strict: as CompBench, "on top of" has no rule and scores 0 (else it is read as "on the top of").
    """
    if strict and relation == "on top of":
        return 0.0
    relation = RELATION_AXIS.get(relation, relation)
    dx, dy = ((box2[:2] + box2[2:]) / 2 - (box1[:2] + box1[2:]) / 2).tolist()  # centre2 - centre1
    iou = float(boxes_iou(box1[None], box2)[0])
    if relation in ("next to", "on side of", "near"):
        # close along either axis -> 1, else decays as distance / max(|dx|, |dy|)
        return 1.0 if min(abs(dx), abs(dy)) < distance else distance / max(abs(dx), abs(dy))
    along, across, sign = {
        "on the left of": (dx, dy, 1),
        "on the right of": (dx, dy, -1),
        "on the top of": (dy, dx, 1),
        "on the bottom of": (dy, dx, -1),
    }[relation]
    # the relation's axis must dominate, with the right sign; overlap above iou_threshold is penalised
    if sign * along <= 0 or abs(along) <= abs(across):
        return 0.0
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def boxes_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(P, 4) boxes, one (4,) box, all (x0, y0, x1, y1) -> (P,) intersection over union (0 if empty)."""
    overlap = torch.minimum(boxes[:, 2:], box[2:]) - torch.maximum(boxes[:, :2], box[:2])
    overlap = overlap.clamp(min=0)  # (P, 2): width and height of each intersection
    intersection = overlap.prod(dim=1)  # (P, 2) -> (P,)
    union = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1) + (box[2:] - box[:2]).prod() - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))


def spatial_rule(
    relation: str, found: list[tuple[float, torch.Tensor] | None], strict: bool = False
) -> float:
    """CompBench's combination of two detections (confidence, box) or None, and the position score."""
    first, second = found
    if first is not None and second is not None:
        position = relation_score(relation, first[1], second[1], strict=strict)
        # score = 0.25 c1 + 0.25 c2 + 0.5 position
        score = 0.25 * first[0] + 0.25 * second[0] + 0.5 * position
    else:
        score = 0.25 * sum(d[0] for d in found if d is not None)
    return score if score >= 0.5 else 0.0  # CompBench zeroes every score below 0.5


# Two boxes that overlap this much are one object (the usual non-maximum-suppression threshold).
SAME_OBJECT_IOU = 0.5
# UniDet reads "girl", "boy", "man" and "woman" as its label "person" (CompBench's 2D_spatial_eval.py).
PERSON_WORDS = words("girl boy man woman")


def load_spatial(
    device: str | torch.device = "cpu",
    model: str = OWLV2_MODEL,
    dtype: str | torch.dtype | None = None,
    box_threshold: float = 0.1,
    labels: str | None = None,
    spacy_model: str = SPACY_MODEL,
) -> RewardFn:
    """APPROXIMATION of T2I-CompBench's UniDet spatial score, with OWLv2 as the detector.

    box_threshold: lowest OWLv2 confidence that counts as a detection.
    labels: strict mode (gap 7): a file of UniDet's label names (one per line, or the `labels` list of
        CompBench's `detection_features.pt`); an object whose noun is not exactly one of them is never
        found, and "on top of" scores no position, as in the original.
    spacy_model: the spaCy pipeline that finds the objects' noun phrases (gap 5).
    """
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    dtype = resolve_dtype(device, dtype)
    vocabulary = read_labels(labels) if labels else None
    processor = from_pretrained(AutoProcessor, model)
    net = from_pretrained(Owlv2ForObjectDetection, model, dtype=dtype).to(device).eval()
    size, mean, std, _ = processor_geometry(processor.image_processor)
    max_length = net.config.text_config.max_position_embeddings

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        unique = {p: parse_spatial_prompt(p, spacy_model) for p in set(prompts)}
        parsed = [unique[p] or ("object", None, "object") for p in prompts]
        queries = [f"a photo of a {noun}" for obj1, _, obj2 in parsed for noun in (obj1, obj2)]
        padding = {"padding": "max_length", "max_length": max_length, "truncation": True}
        tokens = processor.tokenizer(queries, return_tensors="pt", **padding)  # (2N, L)
        pixels = model_pixels(
            images.to(device, torch.float32), size, mean, std, mode="bilinear", pad_value=0.5
        )
        out = net(**tokens.to(device), pixel_values=pixels.to(dtype))  # two queries per image
        confidence = out.logits.float().sigmoid().cpu()  # (N, patches, 2)
        boxes = corner_boxes(out.pred_boxes.float().cpu())  # (N, patches, 4)
        scores = []
        for i, (obj1, relation, obj2) in enumerate(parsed):
            known = [vocabulary is None or unidet_label(o) in vocabulary for o in (obj1, obj2)]
            found = two_detections(boxes[i], confidence[i], box_threshold, known)
            strict = labels is not None
            scores.append(spatial_rule(relation, found, strict) if relation else 0.0)
        return torch.tensor(scores, dtype=torch.float32)

    return reward


def corner_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    centre, half = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat([centre - half, centre + half], dim=-1)


def two_detections(
    boxes: torch.Tensor, confidence: torch.Tensor, threshold: float, allowed: list[bool]
) -> list[tuple[float, torch.Tensor] | None]:
    """The two objects' detections (confidence, box) or None, never one box for both.

    boxes (P, 4) corners, confidence (P, 2) per query. The more confident query takes its best box;
    the other takes its best box that is not the same object (IoU < SAME_OBJECT_IOU), as a detector
    with one label per box would report them. A query that is not allowed (strict mode: no UniDet
    label) or below `threshold` is not found.
    """
    found: list[tuple[float, torch.Tensor] | None] = [None, None]
    taken = None
    for q in sorted((0, 1), key=lambda q: -float(confidence[:, q].max())):
        candidates = confidence[:, q].clone()  # (P,)
        if taken is not None:
            candidates[boxes_iou(boxes, taken) >= SAME_OBJECT_IOU] = -1.0
        best = int(candidates.argmax())
        if allowed[q] and candidates[best] >= threshold:
            found[q] = (float(candidates[best]), boxes[best])
            taken = boxes[best]
    return found


def unidet_label(noun: str) -> str:
    return "person" if noun in PERSON_WORDS else noun


def read_labels(path: str) -> set[str]:
    """UniDet's label names from a text file (one per line) or a .pt file holding {"labels": [...]}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"labels={path!r} not found: pass a text file with one UniDet label per line, or the "
            "dataset/detection_features.pt that T2I-CompBench's UniDet_eval loads"
        )
    if path.endswith(".pt"):
        names = torch.load(path, map_location="cpu", weights_only=True)["labels"]
    else:
        names = Path(path).read_text().splitlines()
    return {name.strip() for name in names if name.strip()}


# === CLIP: non_spatial (CompBench CLIPScore, raw cosine) and clipscore (2.5 * max(cos, 0))
def load_clip_cosine(
    device: str | torch.device = "cpu",
    model: str = CLIP_B32_MODEL,
    dtype: str | torch.dtype | None = None,
) -> RewardFn:
    """(images, prompts) -> (N,) cosine(f_image, f_text) of a CLIP model (originals: float16 on CUDA)."""
    from transformers import AutoProcessor, CLIPModel

    dtype = resolve_dtype(device, dtype, original=torch.float16)
    processor = from_pretrained(AutoProcessor, model)
    net = from_pretrained(CLIPModel, model, dtype=dtype).to(device).eval()
    geometry = processor_geometry(processor.image_processor)
    max_length = net.config.text_config.max_position_embeddings

    @torch.no_grad()
    def cosine(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        pixels = model_pixels(images.to(device, torch.float32), *geometry).to(dtype)
        padding = {"padding": True, "truncation": True, "max_length": max_length}
        tokens = processor.tokenizer(prompts, return_tensors="pt", **padding).to(device)
        f_image = image_features(net.get_image_features(pixel_values=pixels)).float()  # (N, E)
        f_text = image_features(net.get_text_features(**tokens)).float()  # (N, E)
        # cos = <f_image, f_text> / (|f_image| |f_text|)
        return F.cosine_similarity(f_image, f_text, dim=-1).cpu()

    return cosine


def load_clipscore(
    device: str | torch.device = "cpu",
    model: str = CLIP_B32_MODEL,
    dtype: str | torch.dtype | None = None,
    prefix: str = "A photo depicts ",
) -> RewardFn:
    """CLIPScore (Hessel et al. 2021): 2.5 * max(cos(image, prefix + prompt), 0)."""
    cosine = load_clip_cosine(device, model, dtype)
    return lambda images, prompts: 2.5 * cosine(images, [prefix + p for p in prompts]).clamp(min=0)


# === complex: T2I-CompBench 3-in-1
def without_attributes(prompt: str, spacy_model: str = SPACY_MODEL) -> str:
    """CompBench feeds CLIP the complex prompt without its adjectives: spaCy's tokens that are not
    ADJ, joined by spaces ("The fluffy dog sat." -> "The dog sat .")."""
    tokens = spacy_pipeline(spacy_model)(prompt)
    return " ".join(token.text for token in tokens if token.pos_ != "ADJ")


def complex_key(prompt: str) -> str:
    """How 3_in_1.py matches a prompt to its lists: the text before the first ".", lowercased."""
    return prompt.strip().split(".")[0].lower()


def read_complex_lists(folder: str) -> dict[str, str]:
    """{complex_key(prompt): "spatial" | "action"} from CompBench's complex_*_{spatial,action}.txt."""
    routes = {}
    for route in ("spatial", "action"):
        for path in sorted(Path(folder).glob(f"complex_*_{route}.txt")):
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            routes.update({complex_key(line): route for line in lines})
    if not routes:
        raise FileNotFoundError(
            f"no complex_*_spatial.txt / complex_*_action.txt in {folder!r}: pass T2I-CompBench's "
            "examples/dataset folder as lists=..., or lists=None to route by relation words (gap 8)"
        )
    return routes


def complex_route(
    prompt: str, routes: dict[str, str] | None, spacy_model: str = SPACY_MODEL
) -> str:
    """ "spatial", "action" or "spatialaction" (3-way): from the lists, else from relation words."""
    if routes is None:
        return "spatial" if parse_spatial_prompt(prompt, spacy_model) else "action"
    return routes.get(complex_key(prompt), "spatialaction")  # as 3_in_1.py: neither list -> 3-way


def load_complex(
    device: str | torch.device = "cpu",
    blip_model: str = BLIP_VQA_MODEL,
    detector_model: str = OWLV2_MODEL,
    clip_model: str = CLIP_B32_MODEL,
    dtype: str | torch.dtype | None = None,
    lists: str | None = None,
    spacy_model: str = SPACY_MODEL,
) -> RewardFn:
    """3-in-1: attribute (BLIP-VQA) averaged with spatial (detector rule) and/or action (CLIP) scores.

    lists: a folder with CompBench's complex_*_{spatial,action}.txt, which route each prompt as the
        original does (`complex_route`); None: a prompt with a relation word is spatial, any other is
        action, and no prompt gets the 3-way mean (gap 8).
    spacy_model: the spaCy pipeline of the noun phrases and adjectives (gaps 5 and 8).
    """
    routes = read_complex_lists(lists) if lists else None
    attribute = load_blip_vqa(device, model=blip_model, dtype=dtype, spacy_model=spacy_model)
    spatial = load_spatial(device, model=detector_model, dtype=dtype, spacy_model=spacy_model)
    action = load_clip_cosine(device, model=clip_model, dtype=dtype)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        route = [complex_route(p, routes, spacy_model) for p in prompts]
        a = attribute(images, prompts)  # (N,)
        s = branch(spatial, images, prompts, [r != "action" for r in route])
        acted = [r != "spatial" for r in route]
        plain = [without_attributes(p, spacy_model) if n else p for p, n in zip(prompts, acted)]
        c = branch(action, images, plain, acted)
        # score = (a + s) / 2, (a + c) / 2 or (a + s + c) / 3
        three = torch.tensor([r == "spatialaction" for r in route])
        return torch.where(three, (a + s + c) / 3, (a + s + c) / 2)  # the unused branch is 0

    return reward


def branch(
    scorer: RewardFn, images: torch.Tensor, prompts: list[str], needed: list[bool]
) -> torch.Tensor:
    """(N,) scores of `scorer` on the prompts that need it, 0 elsewhere (the rest is never computed)."""
    scores = torch.zeros(len(prompts))
    index = [i for i, n in enumerate(needed) if n]
    if index:
        scores[index] = scorer(images[index], [prompts[i] for i in index])
    return scores


# === aesthetic: LAION aesthetic predictor v2 (as DDPO uses it)
def aesthetic_head() -> torch.nn.Sequential:
    """The predictor's MLP, layer for layer: upstream keys are layers.0 ... layers.7 (see load_head)."""
    return torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


def load_head(path: str | Path) -> torch.nn.Sequential:
    """The head with the weights of `path`; upstream saved `MLP.layers`, so keys start "layers."."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mlp = aesthetic_head()
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return mlp


def fetch_aesthetic_head(url: str = AESTHETIC_HEAD_URL, cache_dir: str | None = None) -> Path:
    """Download the head's weights once into the cache (~/.cache/loop by default); return the path."""
    cache = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loop"
    path = cache / url.rsplit("/", 1)[-1]
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as error:
        raise RuntimeError(
            f"could not download the aesthetic head from {url} ({error}). Offline, download that file "
            f"elsewhere and pass its path: load_reward('aesthetic', head='/path/to/{path.name}') "
            f"(or place it at {path})."
        ) from error
    path.with_suffix(".part").write_bytes(data)
    path.with_suffix(".part").rename(path)
    return path


def load_aesthetic(
    device: str | torch.device = "cpu",
    model: str = CLIP_L14_MODEL,
    head: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> RewardFn:
    """score = MLP(e / |e|), e the CLIP ViT-L/14 image embedding; head = local .pth path or None (fetch)."""
    from transformers import AutoProcessor, CLIPModel

    mlp = load_head(head or fetch_aesthetic_head())  # first: fails fast when offline
    mlp = mlp.to(device).eval()  # the head stays in float32: it is tiny
    dtype = resolve_dtype(device, dtype)
    processor = from_pretrained(AutoProcessor, model)
    net = from_pretrained(CLIPModel, model, dtype=dtype).to(device).eval()
    geometry = processor_geometry(processor.image_processor)

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        pixels = model_pixels(images.to(device, torch.float32), *geometry).to(dtype)
        embedding = image_features(net.get_image_features(pixel_values=pixels)).float()  # (N, 768)
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        return mlp(embedding).squeeze(1).cpu()  # (N, 1) -> (N,)

    return reward


# === The shapes world's exact judges (shapes_world/), imported at load time
def load_shapes(category: str) -> Callable[..., RewardFn]:
    def loader(device: str | torch.device = "cpu", dtype=None) -> RewardFn:
        # exact pixel judges on the CPU: device and dtype are accepted for the common interface
        import shapes_world

        def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            check_inputs(images, prompts)
            return (
                shapes_world.score(images.detach().float().cpu(), prompts, category).float().cpu()
            )

        return reward

    return loader


# === The one entry point
LOADERS = {
    "color": load_blip_vqa,
    "shape": load_blip_vqa,
    "texture": load_blip_vqa,
    "spatial": load_spatial,
    "non_spatial": load_clip_cosine,  # T2I-CompBench's non-spatial score: the raw cosine
    "complex": load_complex,
    "aesthetic": load_aesthetic,
    "jpeg_compressibility": load_jpeg(-1.0),
    "jpeg_incompressibility": load_jpeg(+1.0),
    "clipscore": load_clipscore,
    "shapes_color": load_shapes("color"),
    "shapes_shape": load_shapes("shape"),
    "shapes_texture": load_shapes("texture"),
    "shapes_spatial": load_shapes("spatial"),
}
REWARD_NAMES = tuple(LOADERS)  # every reward's name, in the order of the docstring's list


def load_reward(name: str, device: str | torch.device = "cpu", **options) -> RewardFn:
    """Load reward `name` once; returns fn(images (N, 3, H, W) in [0, 1], prompts) -> (N,) float32 on CPU."""
    if name not in LOADERS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARD_NAMES)}")
    valid = reward_options_of(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"reward {name!r} has no option {', '.join(unknown)}; its options: {', '.join(valid)}"
        )
    return LOADERS[name](device, **options)


def reward_options_of(name: str) -> list[str]:
    """The keyword options of reward `name`'s loader (besides device)."""
    parameters = inspect.signature(LOADERS[name]).parameters
    return [p for p in parameters if p != "device"]


# === T2I-CompBench prompt files
def load_prompts(folder: str, category: str, split: str = "train") -> list[str]:
    """Prompts of `<folder>/<category>_<split>.txt`, one per line (T2I-CompBench's dataset files)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    path = Path(folder) / f"{category}_{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. T2I-CompBench's prompt files ({', '.join(COMPBENCH_CATEGORIES)} x train/val) "
            "are in examples/dataset/ of https://github.com/Karine-Huang/T2I-CompBench; pass that folder."
        )
    return read_prompt_file(str(path))


# === Prompt files and names shared by loop.py and bench/evaluate.py (one place each)
SHAPES_MARKER = "shapes_world.json"  # a model folder with this file draws the shapes world


def resolve_reward_name(model: str, reward: str) -> str:
    """A shapes-world model (a folder with shapes_world.json) scores 'color', 'shape', 'texture'
    and 'spatial' with the world's exact judges: 'color' -> 'shapes_color'."""
    shapes = os.path.isfile(os.path.join(model, SHAPES_MARKER))
    return f"shapes_{reward}" if shapes and f"shapes_{reward}" in REWARD_NAMES else reward


def read_prompt_file(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty stripped lines of a UTF-8 prompt file (a byte-order mark is dropped), the first
    `limit` of them; ValueError naming the file when it is missing, a folder, not UTF-8 or empty."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'is a folder' if path.is_dir() else 'not found'}")
    try:
        lines = path.read_text("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()][:limit]
    if not prompts:
        raise ValueError(f"{path} is empty; write one prompt per line")
    return prompts


def route_lists(reward: str, folder: str | Path) -> dict:
    """complex's `lists` option when `folder` holds CompBench's complex_*_spatial.txt route lists."""
    has_lists = reward == "complex" and folder and any(Path(folder).glob("complex_*_spatial.txt"))
    return {"lists": str(folder)} if has_lists else {}


def check_prompts(name: str, prompts: list[str]) -> None:
    """ValueError naming what reward `name` lacks to score these prompts, before any sampling: the
    shapes world's judges know only that world's words; the BLIP, spatial and complex rewards need
    spaCy's pipeline for any prompt outside that world's template (as T2I-CompBench parses them)."""
    if name.startswith("shapes_"):
        import shapes_world

        for n, prompt in enumerate(prompts, 1):
            try:
                shapes_world.parse_prompt(prompt)
            except ValueError as error:
                reason = " ".join(str(error).split()).split(" in phrase ")[0]
                raise ValueError(
                    f"prompt {n} is not one the shapes world's judge can score: {reason} (known "
                    f"words: colors {', '.join(shapes_world.COLORS)}; shapes "
                    f"{', '.join(shapes_world.SHAPES)})"
                ) from None
    needs_spacy = name in ("color", "shape", "texture", "spatial", "complex")
    if needs_spacy and any(shapes_world_phrases(p) is None for p in prompts):
        try:
            spacy_pipeline()
        except RuntimeError as error:
            raise ValueError(f"prompts: {error}") from None
