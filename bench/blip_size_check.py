"""Which BLIP input size (384 or 480 px) reproduces T2I-CompBench's own BLIP-VQA scores? Needs real weights.

CompBench's BLIPvqa_eval runs the original BLIP VQA checkpoint at 480 px; the transformers conversion
(Salesforce/blip-vqa-capfilt-large) is configured for 384 px (rewards.py gap 2). This script scores the
same images both ways with rewards.py and compares each with the per-image scores CompBench's script
wrote, so the default can be chosen on evidence. It has not been run yet (no GPU with the weights).

1. Generate images into OUT/samples/ named as CompBench expects: "<prompt>_<index>.png", index 0, 1, ...
2. Run CompBench's BLIPvqa_eval on them (`python BLIP_vqa.py --out_dir=OUT/`), which writes
   OUT/annotation_blip/vqa_result.json: one {"question_id": k, "answer": score} per image, k in the
   order of the images sorted by index.
3. python bench/blip_size_check.py --samples OUT/samples \\
       --compbench OUT/annotation_blip/vqa_result.json --blip_model weights/blip
   (rewards.py asks CompBench's questions, from spaCy's noun chunks, so that only the image size
   differs: `pip install spacy && python -m spacy download en_core_web_sm` first.)

Prints, per size, the mean score, CompBench's mean, the mean |difference| and the correlation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewards


def read_samples(folder: str) -> list[tuple[Path, str]]:
    """(path, prompt) of CompBench-named images "<prompt>_<index>.png", sorted by index as CompBench."""
    paths = sorted(Path(folder).glob("*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not paths:
        raise FileNotFoundError(f"no <prompt>_<index>.png images in {folder}")
    return [(path, path.stem.rsplit("_", 1)[0]) for path in paths]


def load_image(path: Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def score_all(
    reward: rewards.RewardFn, samples: list[tuple[Path, str]], batch: int
) -> torch.Tensor:
    scores = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        images = torch.stack([load_image(path) for path, _ in chunk])  # (B, 3, H, W)
        scores.append(reward(images, [prompt for _, prompt in chunk]))
    return torch.cat(scores)


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    correlation = torch.corrcoef(torch.stack([ours, theirs]))[0, 1].item()
    gap = (ours - theirs).abs().mean().item()
    return f"mean {ours.mean():.4f}, |ours - CompBench| {gap:.4f}, correlation {correlation:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", required=True, help="folder of <prompt>_<index>.png images")
    parser.add_argument(
        "--compbench", required=True, help="CompBench's annotation_blip/vqa_result.json"
    )
    parser.add_argument(
        "--blip_model", default=rewards.BLIP_VQA_MODEL, help="hub id or local folder"
    )
    parser.add_argument("--spacy_model", default=rewards.SPACY_MODEL, help="spaCy pipeline name")
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 480])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    samples = read_samples(args.samples)
    answers = {
        r["question_id"]: float(r["answer"]) for r in json.loads(Path(args.compbench).read_text())
    }
    if sorted(answers) != list(range(len(samples))):
        raise ValueError(f"{args.compbench} must hold one answer per image of {args.samples}")
    theirs = torch.tensor([answers[k] for k in range(len(samples))])
    print(f"{len(samples)} images; CompBench's mean {theirs.mean():.4f}")
    for size in args.sizes:
        options = {"model": args.blip_model, "spacy_model": args.spacy_model, "image_size": size}
        reward = rewards.load_reward("color", args.device, dtype="original", **options)
        print(f"{size} px: {compare(score_all(reward, samples, args.batch), theirs)}")


if __name__ == "__main__":
    main()
