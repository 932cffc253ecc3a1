"""One LLaVA-format sample: cleaning, validation with named reasons, and the shard record format.

A sample (spec §7.3) is `{"id", "image", "conversations": [{"from", "value"}, …], "source"}`. Cleaning
drops leading non-human turns, moves the one "<image>" to the start of the first human turn as
"<image>\\n" + text, and refuses what cannot be trained on, each with a reason from REASONS.

A record in the ArrayRecord shards is msgpack of
`{"id": str, "source": str|None, "conversations": [{"from", "value"}], "image": bytes|None,
  "image_size": [W, H]|None, "image_path": str|None}` with the encoded image file bytes (JPEG or PNG).
"""
from __future__ import annotations

import math
from typing import Any

import msgpack

from cambrian_jax.data.templates import GPT, HUMAN, IMAGE_PLACEHOLDER, normalize_turns

# Every reason a sample can be refused for; prepare's summary counts them by these names.
REASONS = {
    "blank_line": "an empty line in a JSONL file",
    "malformed_json": "a line that is not valid JSON (reported as file:line)",
    "wrong_field_types": "not an object, or conversations/turns/values/image of the wrong type",
    "unknown_role": "a turn whose 'from' is not human/user/gpt/assistant",
    "empty_conversations": "no turns, or no assistant reply after dropping leading non-human turns",
    "non_alternating_turns": "turns that do not alternate human/gpt",
    "multiple_image_tokens": "more than one <image> in the text",
    "multiple_images": "an 'image' field that is a list (one image per sample only)",
    "image_token_without_image": "<image> in the text of a sample without an image",
    "image_path_escapes_root": "an absolute image path, or one that leaves --image-root (../, symlinks)",
    "missing_image": "the image file does not exist",
    "unreadable_image": "a file PIL cannot identify or decode",
    "truncated_image": "an image file that ends early",
    "image_too_small": "an image whose shorter side is below --min-side",
    "image_too_large": "an image over --max-pixels (decompression-bomb guard) or --max-file-bytes",
    "extreme_aspect_ratio": "an image more elongated than --max-aspect : 1",
    "unexpected_error": "anything else that failed on one sample (the examples give the exception)",
}

TEXT_ONLY_IMAGE_VALUES = ("", "None", "none", "nan")


class Skip(Exception):
    """A sample refused for `reason` (a key of REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def image_field(sample: dict) -> str | None:
    """The image path, or None for a text-only sample (missing, empty, 'None', 'none', 'nan', NaN)."""
    image = sample.get("image")
    if image is None or (isinstance(image, float) and math.isnan(image)):
        return None
    if isinstance(image, list):
        if len(image) > 1:
            raise Skip("multiple_images", f"{len(image)} images")
        image = image[0] if image else None
        if image is None:
            return None
    if not isinstance(image, str):
        raise Skip("wrong_field_types", f"image is a {type(image).__name__}")
    return None if image.strip() in TEXT_ONLY_IMAGE_VALUES else image


def clean_conversations(conversations: Any, has_image: bool) -> list[dict]:
    """Validated, normalised turns as [{"from": "human"|"gpt", "value": str}]; raises Skip."""
    if not isinstance(conversations, list):
        raise Skip("wrong_field_types", f"conversations is a {type(conversations).__name__}")
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise Skip("wrong_field_types", "a turn is not {'from': str, 'value': str}")
    count = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations)
    if count > 1:
        raise Skip("multiple_image_tokens", f"{count} <image> tokens")
    if count and not has_image:
        raise Skip("image_token_without_image")
    try:
        turns = normalize_turns(conversations, has_image)
    except ValueError as e:
        raise Skip("unknown_role", str(e)) from None
    if not turns or not any(r == GPT for r, _ in turns):
        raise Skip("empty_conversations")
    for k, (role, _) in enumerate(turns):
        if role != (HUMAN if k % 2 == 0 else GPT):
            raise Skip("non_alternating_turns", f"turn {k} is {role!r}")
    return [{"from": r, "value": v} for r, v in turns]


def clean_sample(sample: Any, default_id: str = "") -> dict:
    """{"id", "source", "conversations", "image"} with image a path or None; raises Skip."""
    if not isinstance(sample, dict):
        raise Skip("wrong_field_types", f"the line holds a {type(sample).__name__}, not an object")
    image = image_field(sample)
    conversations = clean_conversations(sample.get("conversations"), image is not None)
    sid = sample.get("id")
    source = sample.get("source")
    return {"id": default_id if sid is None else str(sid), "source": None if source is None else str(source),
            "conversations": conversations, "image": image}


def word_length(conversations: list[dict]) -> int:
    """The reference's length for grouping: words over all turns (spec §7.1)."""
    return sum(len(t["value"].split()) for t in conversations)


def encode_record(sample: dict, image: bytes | None, image_size: tuple[int, int] | None) -> bytes:
    return msgpack.packb({"id": sample["id"], "source": sample.get("source"), "conversations": sample["conversations"],
                          "image": image, "image_size": list(image_size) if image_size else None,
                          "image_path": sample.get("image")}, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)
