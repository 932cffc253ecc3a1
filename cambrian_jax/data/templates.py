"""Conversation templates, tokenisation with the image sentinel, and label masking (spec §4, §6, §10).

Four templates with the reference's exact literals (spec §6.2). A conversation renders as

    system + Σ_turns [user_prefix + U + user_suffix + assistant_prefix + reply_prefix + A + assistant_suffix]

and an inference prompt ends with an open `assistant_prefix`. The first user turn of an image sample
is "<image>\\n" + question, so the image always sits right after `system + user_prefix`.

Tokenisation follows the reference's inference `tokenizer_image_token`: the prompt is split on
"<image>", each chunk tokenised with the tokenizer's automatic BOS, the first chunk kept whole and
the automatic BOS of later chunks dropped, and the sentinel −200 put between the chunks. The tokens
before the image are therefore exactly the inference prompt's (with llama_3 they start with two BOS:
the automatic one and the literal `<|begin_of_text|>`), and their count must equal the model's
`image_position`: it is computed for every sample and a mismatch is an error (spec §10.2–10.3).

Labels (spec §6.3): a token is supervised iff its characters overlap an assistant reply or the turn
terminator that follows it. Computing this from the tokenizer's character offsets of the tokenised
prompt itself (instead of re-tokenising rounds, as the reference does) cannot disagree with the
tokens, so there is no "tokenization mismatch" case. Not shifted: the trainer shifts.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import numpy as np

from cambrian_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"
_ROLES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}


class ImagePositionError(ValueError):
    """The template and tokenizer put the image somewhere other than the model's image_position."""


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str            # turn terminator, supervised
    reply_prefix: str = ""           # text between the assistant header and the reply, supervised
    # Tokenizer conventions of the base LLM family (used by the tiny tokenizer builder and decoding).
    special_tokens: tuple[str, ...] = ()
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = True             # does the family's tokenizer prepend BOS automatically
    stop: tuple[str, ...] = ()       # generation stops at any of these tokens

    @property
    def generation_prompt(self) -> str:
        return self.assistant_prefix


SYS8 = ("You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. \n    As a multimodal AI, "
        "you have the ability to process and analyze images. Whenever an image is present in the conversation, "
        "very carefully examine it and consider its content when formulating your response.\n    You should give "
        "concise responses to very simple questions, but provide thorough responses to more complex and "
        "open-ended questions. ")
SYS13 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the user's questions.")
SYS34 = ("<|im_start|>system\nYou are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. As a "
         "multimodal AI, you have the ability to process and analyze images. Whenever an image is present in the "
         "conversation, very carefully examine it and consider its content when formulating your response. You "
         "should give concise responses to very simple questions, but provide thorough responses to more complex "
         "and open-ended questions.")
SYS3 = "<|system|>\nYou are a helpful AI assistant."

TEMPLATES: dict[str, Template] = {
    "llama_3": Template(
        name="llama_3",
        system="<|begin_of_text|><|start_header_id|>system<|end_header_id|>" + SYS8 + "<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>", user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>", assistant_suffix="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|reserved_special_token_0|>", add_bos=True,
        stop=("<|end_of_text|>", "<|eot_id|>")),
    "vicuna_v1": Template(
        name="vicuna_v1",
        system=SYS13 + " ", user_prefix="USER: ", user_suffix=" ",
        assistant_prefix="ASSISTANT:", reply_prefix=" ", assistant_suffix="</s>",
        special_tokens=("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", pad="<unk>", unk="<unk>", add_bos=True,
        stop=("</s>",)),
    "chatml_direct": Template(
        name="chatml_direct",
        system=SYS34 + "<|im_end|>", user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>",
        assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>",
        special_tokens=("<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        # Whether Yi's tokenizer adds BOS is an open question (spec §12); the tiny builder follows this flag.
        bos="<|startoftext|>", eos="<|im_end|>", pad="<unk>", unk="<unk>", add_bos=False,
        stop=("<|im_end|>",)),
    "phi3": Template(
        name="phi3",
        system=SYS3 + "<|end|>", user_prefix="\n<|user|>\n", user_suffix="<|end|>",
        assistant_prefix="\n<|assistant|>\n", assistant_suffix="<|end|>",
        special_tokens=("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|end|>", "<|user|>",
                        "<|assistant|>"),
        bos="<s>", eos="<|end|>", pad="<|endoftext|>", unk="<unk>", add_bos=True,
        stop=("<|end|>", "<|endoftext|>")),
}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _turn(t: Any) -> tuple[str, str]:
    if isinstance(t, dict):
        role, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
    else:
        role, text = t
    if role not in _ROLES:
        raise ValueError(f"unknown conversation role {role!r}; expected one of {sorted(_ROLES)}")
    if not isinstance(text, str):
        raise ValueError(f"turn text must be a string, got {type(text).__name__}")
    return _ROLES[role], text


def normalize_turns(turns: Iterable[Any], has_image: bool | None = None) -> list[tuple[str, str]]:
    """(role, text) pairs with roles 'human'/'gpt', leading non-human turns dropped, and the image
    placeholder (if any, or if `has_image`) moved to the start of the first human turn as
    "<image>\\n" + text, as the reference's preprocess_multimodal does (spec §4)."""
    out = [_turn(t) for t in turns]
    while out and out[0][0] != HUMAN:
        out.pop(0)
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in out)
    if count > 1:
        raise ValueError(f"a sample may hold at most one {IMAGE_PLACEHOLDER}, found {count}")
    if has_image is None:
        has_image = count == 1
    elif not has_image and count:
        raise ValueError(f"the text holds {IMAGE_PLACEHOLDER} but the sample has no image")
    if has_image and out:
        out = [(r, t.replace(IMAGE_PLACEHOLDER, "")) for r, t in out]
        out[0] = (HUMAN, (IMAGE_PLACEHOLDER + "\n" + out[0][1].strip()).strip())
    return out


def render(template: str | Template, turns: Sequence[tuple[str, str]], open_assistant: bool = False
           ) -> tuple[str, list[tuple[int, int]]]:
    """(prompt, supervised character spans) of already-normalised turns."""
    t = get_template(template)
    parts = [t.system]
    spans = []
    pos = len(t.system)
    expect = HUMAN
    for role, text in turns:
        if role != expect:
            raise ValueError(f"turns must alternate human/gpt starting with human; got {role!r} where "
                             f"{expect!r} was expected")
        if role == HUMAN:
            piece = t.user_prefix + text + t.user_suffix
            parts.append(piece)
            pos += len(piece)
            expect = GPT
        else:
            parts.append(t.assistant_prefix)
            pos += len(t.assistant_prefix)
            reply = t.reply_prefix + text + t.assistant_suffix
            parts.append(reply)
            spans.append((pos, pos + len(reply)))
            pos += len(reply)
            expect = HUMAN
    if open_assistant:
        if expect != GPT:
            raise ValueError("an open assistant turn needs the conversation to end with a human turn")
        parts.append(t.assistant_prefix)
    return "".join(parts), spans


def build_prompt(template: str | Template, turns: Iterable[Any], open_assistant: bool = True) -> str:
    """Inference prompt: the rendered turns, ending with the open assistant header when asked."""
    return render(template, normalize_turns(turns), open_assistant)[0]


@dataclasses.dataclass
class Encoded:
    ids: np.ndarray          # int32 [T], with one IMAGE_TOKEN_INDEX when has_image or a dummy was placed
    labels: np.ndarray       # int32 [T], IGNORE_INDEX where not supervised
    image_index: int | None  # index of the sentinel (None for a text-only sample without a dummy)
    has_image: bool


def _tokenize(prompt: str, tokenizer, spans: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[bool], int | None]:
    """The reference's tokenizer_image_token, with a per-token supervision flag from the offsets."""
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    if len(chunks) > 2:
        raise ValueError(f"a prompt may hold at most one {IMAGE_PLACEHOLDER}, found {len(chunks) - 1}")
    ids: list[int] = []
    sup: list[bool] = []
    image_index = None
    strip_bos = False
    start = 0
    for c, chunk in enumerate(chunks):
        enc = tokenizer.encode(chunk)
        cids, offs = list(enc.ids), list(enc.offsets)
        if c == 0:
            strip_bos = bool(cids) and tokenizer.bos_id is not None and cids[0] == tokenizer.bos_id
        else:
            ids.append(IMAGE_TOKEN_INDEX)
            sup.append(False)
            image_index = len(ids) - 1
            # The reference strips the first token of every later chunk when the first chunk starts with
            # BOS; we strip it only when it is BOS (identical for BOS-adding tokenizers).
            if strip_bos and cids and cids[0] == tokenizer.bos_id:
                cids, offs = cids[1:], offs[1:]
        for i, (s, e) in zip(cids, offs):
            ids.append(i)
            s, e = s + start, e + start
            sup.append(e > s and any(s < b and e > a for a, b in spans))
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, sup, image_index


def tokenize_prompt(prompt: str, tokenizer) -> list[int]:
    """Token ids of an inference prompt, −200 where "<image>" was (reference tokenizer_image_token)."""
    return _tokenize(prompt, tokenizer)[0]


def _position_error(name: str, found: int, expected: int) -> ImagePositionError:
    return ImagePositionError(
        f"template {name!r} with this tokenizer puts the image at token {found}, but the model's "
        f"image_position is {expected}; set model.image_position = {found} (computed by "
        f"cambrian_jax.data.templates.image_position) or use the template/tokenizer the model was trained with")


def encode(template: str | Template, tokenizer, turns: Iterable[Any], *, has_image: bool | None = None,
           image_position: int | None = None) -> Encoded:
    """Tokens and labels of a training conversation.

    Image samples: the sentinel's index is checked against `image_position` (when given) and a
    mismatch raises ImagePositionError naming the template and both numbers. Text-only samples: when
    `image_position` is given, a dummy sentinel is inserted there (tokens after it shift right), as
    the reference does, so every sample has its image block at the same place.
    """
    t = get_template(template)
    turns = normalize_turns(turns, has_image)
    prompt, spans = render(t, turns)
    ids, sup, index = _tokenize(prompt, tokenizer, spans)
    labels = [i if s else IGNORE_INDEX for i, s in zip(ids, sup)]
    image = index is not None
    if image and image_position is not None and index != image_position:
        raise _position_error(t.name, index, image_position)
    if not image and image_position is not None:
        if len(ids) < image_position:
            raise ValueError(f"text-only sample of {len(ids)} tokens is shorter than image_position="
                             f"{image_position}; the template's system prompt cannot be that short")
        ids.insert(image_position, IMAGE_TOKEN_INDEX)
        labels.insert(image_position, IGNORE_INDEX)
        index = image_position
    return Encoded(np.asarray(ids, np.int32), np.asarray(labels, np.int32), index, image)


def image_position(template: str | Template, tokenizer) -> int:
    """Index of the image block for a template and tokenizer (a TextTokenizer or a folder with
    tokenizer.json): the number of tokens before "<image>". The configs and the trainer set
    `model.image_position` from this (spec §10.3)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from cambrian_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415 (tokenizer imports this module)
        tokenizer = load_tokenizer(tokenizer)
    t = get_template(template)
    prompt = build_prompt(t, [(HUMAN, IMAGE_PLACEHOLDER + "\nx")])
    return tokenize_prompt(prompt, tokenizer).index(IMAGE_TOKEN_INDEX)


def stop_ids(template: str | Template, tokenizer) -> tuple[int, ...]:
    """Token ids at which generation stops (the template's terminators that are single tokens)."""
    t = get_template(template)
    ids = [tokenizer.token_to_id(s) for s in t.stop]
    return tuple(i for i in ids if i is not None)
