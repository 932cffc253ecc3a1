"""Answer extraction and matching, with the reference's rules (spec §8.1).

Multiple choice (the reference's `extract_mcq_answer` of its ADE/COCO/OMNI scorers):

    lower-case and strip; for each of "answer is", "answer is:", "answer:" in this order, if present,
    keep what follows its last occurrence; strip; strip trailing '.' (OMNI: '.', ':' and ','), then
    leading '(' and trailing ')'; if more than one character is left keep the first

The ground truth "(A)" gives the letter at index 1, lower-cased. The rules are reproduced with their
quirks, so scores stay comparable with the paper's: "The answer is: (B)." extracts ":" (the
keywords are tried in order, so "answer is" leaves ": (b)"), and "B. left" extracts "b".

OMNI (CV-Bench's 3D half) also accepts the text of the right option (spec §8.1). The reference's
OMNI scorer compares the option text with the answer *after* it was cut to one character, so there
that branch only fires for one-character options; here the option text is compared with the answer
before the cut (as the reference's MMVP scorer does), so "Left." and "the answer is left" count
when "left" is the right option — and a letter is still matched exactly as the reference matches it.

Short answers (GQA-style sets): lower-case, strip, drop a trailing '.', collapse white space, then
exact match against the answer (or any of a list of answers).
"""
from __future__ import annotations

import re
from typing import Sequence

KEYWORDS = ("answer is", "answer is:", "answer:")

# rule name → (trailing characters stripped, whether the option text counts)
RULES = {
    "ade_coco": (".", False),     # CV-Bench 2D (ADE20K, COCO) scorers
    "omni": (".:,", True),        # CV-Bench 3D (Omni3D) scorer; also MMBench's stripping
}


def _after_keywords(text: str) -> str:
    text = text.lower().strip()
    for keyword in KEYWORDS:
        if keyword in text:
            text = text.split(keyword)[-1]
    return text


def extract_text(prediction: str, strip: str = ".") -> str:
    """The reference's extraction without the final cut to one character (its MMVP variant)."""
    return _after_keywords(prediction).strip().rstrip(strip).lstrip("(").rstrip(")")


def extract_choice(prediction: str, strip: str = ".") -> str:
    """The reference's `extract_mcq_answer`: a lower-case letter (or whatever single character is left)."""
    text = extract_text(prediction, strip)
    return text[0] if len(text) > 1 else text


def answer_letter(answer: str) -> str:
    """Ground truth "(A)" → "a" (the reference reads index 1); a bare "A" → "a"."""
    a = str(answer).strip().lower()
    return a[1] if len(a) >= 2 and a[0] == "(" else a[:1]


def is_correct_choice(prediction: str, answer: str, choices: Sequence[str] | None = None, rule: str = "omni") -> bool:
    if rule not in RULES:
        raise ValueError(f"unknown answer rule {rule!r}; known: {sorted(RULES)}")
    strip, option_text = RULES[rule]
    gt = answer_letter(answer)
    got = extract_choice(prediction, strip)
    if got == gt:
        return True
    if option_text and choices:
        index = ord(gt) - ord("a") if gt else -1
        if 0 <= index < len(choices):
            option = str(choices[index]).strip().lower()
            return got == option or extract_text(prediction, strip).strip() == option
    return False


def normalize_short(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).lower().strip().rstrip(".").strip())


def is_correct_short(prediction: str, answer: str | Sequence[str]) -> bool:
    answers = [answer] if isinstance(answer, str) else list(answer)
    return normalize_short(prediction) in {normalize_short(a) for a in answers}


def is_correct(prediction: str, answer, choices: Sequence[str] | None = None, rule: str = "omni") -> bool:
    """Multiple choice when the item has choices, short answer otherwise."""
    if choices:
        return is_correct_choice(prediction, answer, choices, rule)
    return is_correct_short(prediction, answer)
