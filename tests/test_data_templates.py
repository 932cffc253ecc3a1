"""Templates (spec §6.2), tokenisation with the image sentinel (§4, §10.2) and label masking (§6.3)."""
import numpy as np
import pytest

from cambrian_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian_jax.data import templates as T
from cambrian_jax.data.tokenizer import build_tokenizer, load_tokenizer

CORPUS = ["How many red circles are in the image?", "Describe the image.", "Two red circles.", "(A)", "Yes."]
TURNS = [{"from": "gpt", "value": "dropped leading reply"},
         {"from": "human", "value": "How many red circles are in the image?<image>"},
         {"from": "gpt", "value": "(A)"},
         {"from": "human", "value": "Describe the image."},
         {"from": "gpt", "value": "Two red circles."}]
Q1 = "<image>\nHow many red circles are in the image?"

# The spec's literals, written out by hand (§6.2).
EXPECTED = {
    "llama_3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>You are Cambrian, a highly intelligent multimodal "
        "AI trained by NYU Vision X. \n    As a multimodal AI, you have the ability to process and analyze images. "
        "Whenever an image is present in the conversation, very carefully examine it and consider its content when "
        "formulating your response.\n    You should give concise responses to very simple questions, but provide "
        "thorough responses to more complex and open-ended questions. <|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>{Q1}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>(A)<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>Describe the image.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>Two red circles.<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>"),
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. "
        f"USER: {Q1} ASSISTANT: (A)</s>USER: Describe the image. ASSISTANT: Two red circles.</s>",
        "ASSISTANT:"),
    "chatml_direct": (
        "<|im_start|>system\nYou are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. As a "
        "multimodal AI, you have the ability to process and analyze images. Whenever an image is present in the "
        "conversation, very carefully examine it and consider its content when formulating your response. You "
        "should give concise responses to very simple questions, but provide thorough responses to more complex "
        "and open-ended questions.<|im_end|>"
        f"<|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n(A)<|im_end|>"
        "<|im_start|>user\nDescribe the image.<|im_end|><|im_start|>assistant\nTwo red circles.<|im_end|>",
        "<|im_start|>assistant\n"),
    "phi3": (
        f"<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n{Q1}<|end|>\n<|assistant|>\n(A)<|end|>"
        "\n<|user|>\nDescribe the image.<|end|>\n<|assistant|>\nTwo red circles.<|end|>",
        "\n<|assistant|>\n"),
}
TERMINATOR = {"llama_3": "<|eot_id|>", "vicuna_v1": "</s>", "chatml_direct": "<|im_end|>", "phi3": "<|end|>"}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {name: build_tokenizer(root / name, CORPUS, name) for name in T.TEMPLATES}


@pytest.mark.parametrize("name", sorted(T.TEMPLATES))
def test_exact_strings(name):
    full, open_end = EXPECTED[name]
    turns = T.normalize_turns(TURNS)
    assert T.render(name, turns)[0] == full
    prompt = T.build_prompt(name, TURNS[:2])
    assert prompt.endswith(open_end)
    assert prompt == full[:full.index(Q1) + len(Q1)] + T.get_template(name).user_suffix + open_end


def test_sys8_whitespace_artefact():
    assert "NYU Vision X. \n    As a multimodal" in T.SYS8
    assert "response.\n    You should" in T.SYS8
    assert T.SYS8.endswith("questions. ")


def test_image_moved_and_leading_reply_dropped():
    turns = T.normalize_turns(TURNS)
    assert turns[0] == ("human", Q1)
    assert [r for r, _ in turns] == ["human", "gpt", "human", "gpt"]
    # An image sample without the placeholder gets it; text-only with one is refused.
    assert T.normalize_turns([("human", "Hi")], has_image=True)[0][1] == "<image>\nHi"
    with pytest.raises(ValueError):
        T.normalize_turns([("human", "<image> Hi")], has_image=False)
    with pytest.raises(ValueError, match="at most one"):
        T.normalize_turns([("human", "<image><image>")])


@pytest.mark.parametrize("name", sorted(T.TEMPLATES))
def test_label_mask_supervises_replies_and_terminators(name, toks):
    tok = toks[name]
    p = T.image_position(name, tok)
    enc = T.encode(name, tok, TURNS, image_position=p)
    assert enc.ids[p] == IMAGE_TOKEN_INDEX and enc.labels[p] == IGNORE_INDEX
    sup = enc.labels != IGNORE_INDEX
    np.testing.assert_array_equal(enc.labels[sup], enc.ids[sup])
    # The supervised tokens form exactly two runs: reply 1 + terminator, reply 2 + terminator.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], sup.astype(int), [0]])))
    runs = [tok.decode(enc.ids[a:b], skip_special_tokens=False) for a, b in zip(edges[::2], edges[1::2])]
    lead = T.get_template(name).reply_prefix
    assert runs == [f"{lead}(A){TERMINATOR[name]}", f"{lead}Two red circles.{TERMINATOR[name]}"]
    # Everything else, including BOS, system prompt, user turns and role headers, is ignored.
    assert not sup[:p + 1].any()


def test_image_position_mismatch_names_template_and_both_numbers(toks):
    tok = toks["phi3"]
    p = T.image_position("phi3", tok)
    with pytest.raises(T.ImagePositionError) as e:
        T.encode("phi3", tok, TURNS, image_position=p + 3)
    msg = str(e.value)
    assert "'phi3'" in msg and f"token {p}" in msg and f"image_position is {p + 3}" in msg


def test_llama3_double_bos(toks):
    tok = toks["llama_3"]
    ids = T.tokenize_prompt(T.build_prompt("llama_3", [("human", "<image>\nHi")]), tok)
    bos = tok.bos_id
    assert ids[:2] == [bos, bos] and bos not in ids[2:]
    # The chunk after the image has its automatic BOS dropped.
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[k + 1] != bos


def test_text_only_gets_dummy_sentinel(toks):
    tok = toks["vicuna_v1"]
    p = T.image_position("vicuna_v1", tok)
    turns = [("human", "Describe the image."), ("gpt", "Yes.")]
    enc = T.encode("vicuna_v1", tok, turns, image_position=p)
    plain = T.encode("vicuna_v1", tok, turns)
    assert not enc.has_image and plain.image_index is None
    np.testing.assert_array_equal(np.delete(enc.ids, p), plain.ids)
    assert enc.ids[p] == IMAGE_TOKEN_INDEX and enc.labels[p] == IGNORE_INDEX


def reference_tokenizer_image_token(prompt, tokenizer):
    """The reference's tokenizer_image_token (cambrian/mm_utils.py), on a transformers tokenizer."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [e for sub in zip(x, [sep] * len(x)) for e in sub][:-1]

    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for x in insert_separator(chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


@pytest.mark.parametrize("name", sorted(T.TEMPLATES))
def test_matches_transformers_tokenizer(name, toks):
    from transformers import AutoTokenizer
    tok = toks[name]
    hf = AutoTokenizer.from_pretrained(tok.source_dir)
    assert len(hf) == len(tok) and hf.bos_token_id == tok.bos_id
    prompt = T.build_prompt(name, TURNS[1:4])
    assert T.tokenize_prompt(prompt, tok) == reference_tokenizer_image_token(prompt, hf)
    full = T.render(name, T.normalize_turns(TURNS))[0]
    assert T.encode(name, tok, TURNS).ids.tolist() == reference_tokenizer_image_token(full, hf)
    # Training prefix before the image == inference prefix.
    assert T.encode(name, tok, TURNS).ids.tolist()[:T.image_position(name, tok) + 1] == \
        T.tokenize_prompt(prompt, tok)[:T.image_position(name, tok) + 1]


def test_tokenizer_round_trip_and_stop_ids(toks):
    tok = toks["phi3"]
    text = "How many red circles are in the image? Ünïcödé \n\t(A)"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("Ġnot-a-word-xyz").ids  # bytes cover anything
    assert T.stop_ids("phi3", tok) == (tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>"))
    assert len(tok) % 64 == 0
    again = load_tokenizer(tok.source_dir)
    assert again.encode(text).ids == tok.encode(text).ids and again.bos_id == tok.bos_id
    # Corpus words are single tokens.
    assert tok.encode("How many red circles", add_special_tokens=False).tokens == ["How", "Ġmany", "Ġred", "Ġcircles"]


def test_image_position_from_a_folder(toks):
    tok = toks["phi3"]
    assert T.image_position("phi3", tok.source_dir) == T.image_position("phi3", tok) == 14
