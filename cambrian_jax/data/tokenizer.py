"""Loading a local `tokenizer.json`, and building tiny byte-level BPE tokenizers for tests and the
synthetic dataset.

Loading never runs remote code and never downloads: a directory with `tokenizer.json` (and,
optionally, `tokenizer_config.json` / `special_tokens_map.json` naming the BOS/EOS/pad tokens).

The tiny tokenizer is a byte-level BPE like Llama-3's: every text round-trips (256 byte symbols),
every word piece of a given corpus is one token (whole pieces in the vocabulary, matched before
merges with `ignore_merges`, and reachable through chained merges for tokenizers versions without
it), the template's special tokens are added tokens, and a post-processor prepends BOS when the
template's LLM family does — so BOS handling behaves as with the real tokenizers (spec §6.2).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from cambrian_jax.data.templates import GPT, HUMAN, Template, get_template, render


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids the data path needs. Picklable."""

    def __init__(self, tokenizer: Tokenizer, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None):
        self.tokenizer = tokenizer
        self.source_dir: str | None = None      # the folder it was loaded from, if any
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.bos_id = self.token_to_id(bos)
        self.eos_id = self.token_to_id(eos)
        self.pad_id = self.token_to_id(pad)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True):
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def __getstate__(self):
        return {"json": self.tokenizer.to_str(), "bos": self.bos_token, "eos": self.eos_token,
                "pad": self.pad_token, "source_dir": self.source_dir}

    def __setstate__(self, state):
        self.__init__(Tokenizer.from_str(state["json"]), state["bos"], state["eos"], state["pad"])
        self.source_dir = state["source_dir"]


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load `path/tokenizer.json` (or the file itself) with the special tokens named beside it."""
    path = os.fspath(path)
    file = path if path.endswith(".json") and os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}; give a local directory holding tokenizer.json")
    tok = Tokenizer.from_file(file)
    names: dict[str, str | None] = {}
    folder = os.path.dirname(file)
    for meta in ("special_tokens_map.json", "tokenizer_config.json"):
        f = os.path.join(folder, meta)
        if os.path.isfile(f):
            with open(f) as fh:
                d = json.load(fh)
            for key in ("bos_token", "eos_token", "pad_token"):
                if d.get(key) is not None:
                    names[key] = _token_name(d[key])
    out = TextTokenizer(tok, names.get("bos_token"), names.get("eos_token"), names.get("pad_token"))
    out.source_dir = folder
    return out


def as_tokenizer(tokenizer) -> TextTokenizer:
    """A TextTokenizer from a TextTokenizer or a directory path."""
    return tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)


_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def pieces(texts: Iterable[str], special_tokens: Iterable[str] = ()) -> dict[str, int]:
    """Byte-level pre-tokenised pieces of `texts` (special tokens split out first) with counts."""
    specials = sorted(set(special_tokens), key=len, reverse=True)
    split = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    counts: dict[str, int] = {}
    for text in texts:
        for segment in (split.split(text) if split else [text]):
            for piece, _ in _BYTE_LEVEL.pre_tokenize_str(segment):
                counts[piece] = counts.get(piece, 0) + 1
    return counts


def build_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str], template: str | Template = "phi3", *,
                    add_bos: bool | None = None, min_count: int = 1, vocab_multiple: int = 64,
                    chain_merges: bool = True, ignore_merges: bool = True,
                    model_max_length: int = 2048) -> TextTokenizer:
    """Build a byte-level BPE over the word pieces of `texts` plus `template`'s special tokens.

    Ids: the template's special tokens first (so id 0 is e.g. <unk>), then the 256 byte symbols,
    then the corpus pieces (sorted, count ≥ min_count) and, with `chain_merges`, their prefixes;
    reserved special tokens pad the size to a multiple of `vocab_multiple` (len(tokenizer) is the
    model's vocab_size, spec §14.4). The template's system prompt and role strings are always
    included in the corpus. Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json
    to `out_dir` (merges as "a b" strings, which every tokenizers version reads, spec §14.11; set
    ignore_merges=False for a file the reference's tokenizers 0.15 must load).
    """
    t = get_template(template)
    add_bos = t.add_bos if add_bos is None else add_bos
    specials = list(dict.fromkeys(t.special_tokens))
    literals = [render(t, [(HUMAN, "x"), (GPT, "y"), (HUMAN, "x"), (GPT, "y")])[0]]
    counts = pieces(list(texts) + literals, specials)
    vocab: dict[str, int] = {}
    for s in specials:
        vocab[s] = len(vocab)
    for b in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(b, len(vocab))
    words = sorted(p for p, c in counts.items() if c >= min_count and len(p) > 1)
    merges: list[tuple[str, str]] = []
    if chain_merges:
        chain = sorted({(w[:k], w[k]) for w in words for k in range(1, len(w))}, key=lambda m: (len(m[0]), m))
        for a, b in chain:
            vocab.setdefault(a + b, len(vocab))
        merges = chain
    for w in words:
        vocab.setdefault(w, len(vocab))
    n_reserved = (-len(vocab)) % vocab_multiple if vocab_multiple else 0
    reserved = [f"<|reserved_{i}|>" for i in range(n_reserved)]
    for r in reserved:
        vocab[r] = len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = _BYTE_LEVEL
    tok.decoder = decoders.ByteLevel()
    byte_level_post = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos_post = processors.TemplateProcessing(single=f"{t.bos}:0 $A:0", pair=f"{t.bos}:0 $A:0 {t.bos}:1 $B:1",
                                                 special_tokens=[(t.bos, vocab[t.bos])])
        tok.post_processor = processors.Sequence([byte_level_post, bos_post])
    else:
        tok.post_processor = byte_level_post
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials + reserved])

    os.makedirs(out_dir, exist_ok=True)
    spec = json.loads(tok.to_str())
    spec["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    if not ignore_merges:
        spec["model"].pop("ignore_merges", None)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(spec, f, ensure_ascii=False, indent=1)
    special_map = {k: v for k, v in (("bos_token", t.bos), ("eos_token", t.eos), ("pad_token", t.pad),
                                     ("unk_token", t.unk)) if v is not None}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=1)
    config = dict(special_map, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos,
                  add_eos_token=False, model_max_length=model_max_length, padding_side="right",
                  clean_up_tokenization_spaces=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return load_tokenizer(out_dir)
