"""A synthetic, vision-centric dataset a tiny model can learn on a CPU in minutes.

Images: flat-coloured shapes (circle, square, triangle in red, green, blue, yellow), non-overlapping,
drawn without antialiasing (every pixel is exactly a palette colour, so tests can re-read the answers
from the PNG). Image sizes vary in size and aspect ratio, including the ones that exercise the padding
masks (320×176, 176×320, 256×144, …; spec §14.2).

Tasks (CV-Bench style, spec §8.2): the user turn is "<image>\\n" + question + lettered choices
("Question\\n(A) x\\n(B) y") + "\\nAnswer with the option's letter from the given choices directly.",
the answer "(A)"-style.

    count     How many shapes are in the image?                   (A) 1 (B) 2 (C) 3 (D) 4   (chance 1/4)
    relation  Where is the red shape located with respect to      (A) left (B) right, or    (chance 1/2)
              the blue shape?                                      (A) above (B) below
    depth     Which shape is closer to the camera? (bigger = closer) (A) the red shape        (chance 1/2)
                                                                     (B) the blue shape
    caption   "Describe the image." → "Two red circles and a blue square on a gray background."  (stage 1)

Made so that a model of a few hundred thousand parameters can learn it from random weights on a 2-core
CPU in minutes, yet only by looking:
- the choices come in a fixed order and the right answer cycles with the per-task sample counter, so
  letters are exactly balanced and the text alone says nothing (a blind model scores chance);
- image size and background are drawn before the layout, so they say nothing about the answer either
  (a blanked image keeps its size and padding masks);
- the question images have a white background and shapes of 12–30 % of the long side, and the two
  objects a relation/depth question compares are always the red and the blue one: at the towers' toy
  resolutions (28–64 px) colour and size are what random towers see first, and a question that first
  has to be read to know which object it is about takes a tiny LLM thousands of steps, not hundreds.
Captions keep the varied backgrounds and smaller shapes (1–5 of any kind).

Deterministic: sample i of a split is a function of (seed, split, i) only, so splits never depend on
how many samples are drawn; train and test use different streams.

    python -m cambrian_jax.data.synthetic --out DIR [--num-train N] [--num-test N] [--template phi3]

writes DIR/{train,test}.jsonl (+ caption_{train,test}.jsonl), DIR/images/…png and DIR/tokenizer/.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from cambrian_jax import cli

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZES = ((320, 176), (176, 320), (256, 144), (144, 256), (224, 224), (256, 192), (192, 256), (240, 240))
NUMBER_WORDS = ("zero", "a", "two", "three", "four", "five", "six")

VQA_TASKS = ("count", "relation", "depth")
CAPTION_TASKS = ("caption",)
TASKS = VQA_TASKS + CAPTION_TASKS
NUM_CHOICES = {"count": 4, "relation": 2, "depth": 2}
CHANCE = {task: 1.0 / n for task, n in NUM_CHOICES.items()}   # accuracy of guessing, per task
INSTRUCTION = "Answer with the option's letter from the given choices directly."
COUNT_QUESTION = "How many shapes are in the image?"
RELATION_QUESTION = "Where is the red shape located with respect to the blue shape?"
DEPTH_QUESTION = "Which shape is closer to the camera?"
DEPTH_CHOICES = ("the red shape", "the blue shape")
CAPTION_PROMPT = "Describe the image."
SPLITS = {"train": 0, "test": 1, "val": 2}
LETTERS = "ABCD"


def _name(color: str, shape: str, plural: bool = False) -> str:
    return f"{color} {shape}{'s' if plural else ''}"


def _place(rng: np.random.Generator, size: tuple[int, int], radii: Sequence[int], tries: int = 200):
    """Centres for shapes of half-extent `radii`, bounding boxes apart by a margin; None if no fit."""
    w, h = size
    margin = 3
    centres: list[tuple[int, int]] = []
    for r in radii:
        for _ in range(tries):
            if 2 * r + 2 * margin >= min(w, h):
                return None
            cx = int(rng.integers(r + margin, w - r - margin))
            cy = int(rng.integers(r + margin, h - r - margin))
            if all(abs(cx - x) >= r + q + margin or abs(cy - y) >= r + q + margin
                   for (x, y), q in zip(centres, radii)):
                centres.append((cx, cy))
                break
        else:
            return None
    return centres


def draw(size: tuple[int, int], background: str, objects: Sequence[dict]) -> Image.Image:
    """An RGB image of `objects` ({"shape", "color", "cx", "cy", "r"}), no antialiasing."""
    img = Image.new("RGB", tuple(size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r, fill = o["cx"], o["cy"], o["r"], COLORS[o["color"]]
        if o["shape"] == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _kinds(rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """k random (color, shape) pairs (repeats allowed)."""
    pool = [(c, s) for c in COLORS for s in SHAPES]
    return [pool[int(i)] for i in rng.integers(0, len(pool), size=k)]


def _layout(rng, size, kinds, radii):
    centres = _place(rng, size, radii)
    if centres is None:
        return None
    return [{"color": c, "shape": s, "cx": x, "cy": y, "r": int(r)} for (c, s), (x, y), r in zip(kinds, centres, radii)]


def _radius(rng, size, lo=0.06, hi=0.10) -> int:
    return int(round(max(size) * rng.uniform(lo, hi)))


def _count(rng, size, slot):
    k = 1 + slot % 4
    r = _radius(rng, size, 0.12, 0.20)
    objects = _layout(rng, size, _kinds(rng, k), [r] * k)
    return None if objects is None else (objects, COUNT_QUESTION, ["1", "2", "3", "4"], k - 1)


def _red_and_blue(rng, size, radii):
    kinds = [("red", SHAPES[int(rng.integers(0, len(SHAPES)))]), ("blue", SHAPES[int(rng.integers(0, len(SHAPES)))])]
    return _layout(rng, size, kinds, radii)


def _relation(rng, size, slot):
    objects = _red_and_blue(rng, size, [_radius(rng, size, 0.12, 0.20), _radius(rng, size, 0.12, 0.20)])
    if objects is None:
        return None
    red, blue = objects
    axis, words = ("cx", ("left", "right")) if rng.integers(0, 2) else ("cy", ("above", "below"))
    if abs(red[axis] - blue[axis]) < red["r"] + blue["r"]:
        return None                            # not clearly separated on the asked axis
    answer = slot % 2                          # 0: red is left of / above blue
    if (red[axis] > blue[axis]) != bool(answer):   # the two trade places
        for key in ("cx", "cy", "r"):
            red[key], blue[key] = blue[key], red[key]
    return objects, RELATION_QUESTION, list(words), answer


def _depth(rng, size, slot):
    small = _radius(rng, size, 0.10, 0.14)
    big = int(round(small * rng.uniform(1.7, 2.2)))
    answer = slot % 2                          # 0: red is the bigger, closer one
    objects = _red_and_blue(rng, size, [big, small] if answer == 0 else [small, big])
    return None if objects is None else (objects, DEPTH_QUESTION, list(DEPTH_CHOICES), answer)


def caption(objects: Sequence[dict], background: str) -> str:
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[(o["color"], o["shape"])] = counts.get((o["color"], o["shape"]), 0) + 1
    order = sorted(counts, key=lambda cs: (list(COLORS).index(cs[0]), SHAPES.index(cs[1])))
    parts = [f"{NUMBER_WORDS[counts[cs]]} {_name(*cs, plural=counts[cs] > 1)}" for cs in order]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + f" on a {background} background."


def _caption(rng, size, slot):
    kinds = _kinds(rng, int(rng.integers(1, 6)))
    objects = _layout(rng, size, kinds, [_radius(rng, size) for _ in kinds])
    return None if objects is None else (objects, None, None, None)


_MAKERS = {"count": _count, "relation": _relation, "depth": _depth, "caption": _caption}


def format_prompt(question: str, choices: Sequence[str]) -> str:
    """CV-Bench's `prompt` field: the question and the lettered choices, one per line."""
    return question + "".join(f"\n({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def sample(i: int, split: str = "train", seed: int = 0, tasks: Sequence[str] = VQA_TASKS) -> dict:
    """Sample `i` of a split: a LLaVA-format dict with a PIL image and its metadata under "meta"."""
    for t in tasks:
        if t not in _MAKERS:
            raise ValueError(f"unknown synthetic task {t!r}; known: {sorted(_MAKERS)}")
    task = tasks[i % len(tasks)]
    slot = i // len(tasks)                       # per-task counter: the right answer cycles with it
    # Size and background are drawn once, outside the layout retries: were they redrawn with each
    # retry, sizes where a layout fits more easily would be more common for some answers, and the
    # padding masks (which a blanked image keeps) would leak the answer.
    rng = np.random.default_rng([seed, SPLITS[split], i])
    size = IMAGE_SIZES[int(rng.integers(0, len(IMAGE_SIZES)))]
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))] if task == "caption" else "white"
    for attempt in range(1000):
        rng = np.random.default_rng([seed, SPLITS[split], i, attempt])
        made = _MAKERS[task](rng, size, slot)
        if made is not None:
            break
    else:  # pragma: no cover - every task fits long before this
        raise RuntimeError(f"could not lay out synthetic sample {i}")
    objects, question, choices, answer_index = made
    image = draw(size, background, objects)
    meta = {"task": task, "size": list(size), "background": background, "objects": objects}
    if task == "caption":
        user, answer = CAPTION_PROMPT, caption(objects, background)
    else:
        user = format_prompt(question, choices) + "\n" + INSTRUCTION
        answer = f"({LETTERS[answer_index]})"
        meta.update(question=question, choices=list(choices), answer_index=answer_index,
                    num_choices=len(choices), chance=CHANCE[task])
    meta["answer"] = answer
    return {"id": f"synth-{split}-{task}-{i:07d}", "image": image, "source": f"synthetic_{task}",
            "conversations": [{"from": "human", "value": "<image>\n" + user}, {"from": "gpt", "value": answer}],
            "meta": meta}


def generate(n: int, split: str = "train", tasks: Sequence[str] = VQA_TASKS, seed: int = 0, start: int = 0) -> list[dict]:
    """Samples start … start+n−1 of a split, in memory (PIL images)."""
    return [sample(i, split, seed, tuple(tasks)) for i in range(start, start + n)]


def write(out_dir: str, n: int, split: str = "train", tasks: Sequence[str] = VQA_TASKS, seed: int = 0,
          name: str | None = None) -> str:
    """Write `n` samples as LLaVA JSONL (image paths relative to out_dir) + PNG files; returns the JSONL path."""
    name = name or split
    os.makedirs(os.path.join(out_dir, "images", name), exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            s = sample(i, split, seed, tuple(tasks))
            rel = os.path.join("images", name, s["id"] + ".png")
            s["image"].save(os.path.join(out_dir, rel))
            f.write(json.dumps(dict(s, image=rel)) + "\n")
    return path


def extract_letter(prediction: str) -> str:
    """CV-Bench's answer extraction (spec §8.1), lower-case letter (or the text's first character)."""
    t = prediction.lower().strip()
    for key in ("answer is:", "answer is", "answer:"):
        if key in t:
            t = t.split(key)[-1].strip()
            break
    t = t.rstrip(".").strip()
    t = t[1:] if t.startswith("(") else t
    t = t[:-1] if t.endswith(")") else t
    return t[:1]


def is_correct(prediction: str, answer: str) -> bool:
    return extract_letter(prediction) == answer.strip()[1:2].lower()


def corpus_texts() -> list[str]:
    """Every text the dataset can produce, as phrases: the tiny tokenizer's corpus."""
    texts = [INSTRUCTION, CAPTION_PROMPT, "Describe the image.", "\n"]
    texts += [f"({L})" for L in LETTERS] + [f"\n({L}) " for L in LETTERS]
    names = [_name(c, s, p) for c in COLORS for s in SHAPES for p in (False, True)]
    texts += [COUNT_QUESTION, RELATION_QUESTION, DEPTH_QUESTION] + [f"\n(A) {c}" for c in DEPTH_CHOICES]
    for word in ("left", "right", "above", "below") + tuple(str(v) for v in range(7)):
        texts.append(f"\n(A) {word}")
    for number in NUMBER_WORDS:
        for name in names:
            texts += [f"{number.capitalize()} {name}, {number} {name} and {number} {name}"]
    texts += [f" on a {b} background." for b in BACKGROUNDS]
    return texts


def vocabulary() -> list[str]:
    """The byte-level word pieces of the dataset (the tiny tokenizer's non-byte vocabulary)."""
    from cambrian_jax.data.tokenizer import pieces  # noqa: PLC0415
    return sorted(pieces(corpus_texts()))


def build_tiny_tokenizer(out_dir: str, template: str = "phi3", **kwargs):
    """A byte-level BPE whose word pieces cover this dataset and the template (tokenizer.build_tokenizer)."""
    from cambrian_jax.data.tokenizer import build_tokenizer  # noqa: PLC0415
    return build_tokenizer(out_dir, corpus_texts(), template, **kwargs)


@cli.guarded
def main(argv: list[str] | None = None) -> None:
    from cambrian_jax.data import templates  # noqa: PLC0415

    p = cli.ArgumentParser(prog="python -m cambrian_jax.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=6000)
    p.add_argument("--num-test", type=int, default=600)
    p.add_argument("--num-caption", type=int, default=3000, help="stage-1 caption samples (train); test gets 1/10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="phi3")
    a = p.parse_args(argv)
    # Every argument is checked before anything is written.
    if a.template not in templates.TEMPLATES:
        raise cli.InputError(f"--template {a.template!r} is not one of {', '.join(sorted(templates.TEMPLATES))}")
    for flag, n in (("--num-train", a.num_train), ("--num-test", a.num_test), ("--num-caption", a.num_caption)):
        if n < 0:
            raise cli.InputError(f"{flag} {n}: give a number of samples, 0 or more")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise cli.InputError(f"--out {a.out} is a file; give a folder (it gets train/test JSONL, images/ and "
                             "tokenizer/)")
    for split, n in (("train", a.num_train), ("test", a.num_test)):
        print(write(a.out, n, split, VQA_TASKS, a.seed))
    for split, n in (("train", a.num_caption), ("test", max(1, a.num_caption // 10))):
        print(write(a.out, n, split, CAPTION_TASKS, a.seed, name=f"caption_{split}"))
    tok = build_tiny_tokenizer(os.path.join(a.out, "tokenizer"), a.template)
    print(f"tokenizer: {os.path.join(a.out, 'tokenizer')} ({len(tok)} tokens, template {a.template})")


if __name__ == "__main__":
    main()
