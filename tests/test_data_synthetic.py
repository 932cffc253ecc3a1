"""The synthetic dataset: deterministic, answers re-read from the drawn pixels, balanced letters."""
import collections
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cambrian_jax.data import synthetic as S
from cambrian_jax.data.tokenizer import pieces


def _objects_in(image):
    """(color, shape, cx, cy, area) of every shape, parsed from the pixels alone."""
    a = np.asarray(image)
    found = []
    for color, rgb in S.COLORS.items():
        labels, n = ndimage.label((a == rgb).all(-1))
        for k, sl in enumerate(ndimage.find_objects(labels), 1):
            blob = labels[sl] == k
            fill = blob.mean()
            shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            found.append((color, shape, (sl[1].start + sl[1].stop - 1) / 2, (sl[0].start + sl[0].stop - 1) / 2,
                          blob.sum()))
    return found


def _name(color, shape):
    return f"{color} {shape}"


def test_answers_agree_with_the_pixels():
    for s in S.generate(120, tasks=S.TASKS, seed=5):
        m = s["meta"]
        objs = _objects_in(s["image"])
        assert len(objs) == len(m["objects"])
        assert s["image"].size == tuple(m["size"])
        right = m["choices"][m["answer_index"]] if m["task"] != "caption" else None
        if m["task"] == "count":
            assert right == str(len(objs))
        elif m["task"] in ("relation", "depth"):
            assert sorted(c for c, *_ in objs) == ["blue", "red"]
            red, blue = (next(o for o in objs if o[0] == c) for c in ("red", "blue"))
            if m["task"] == "depth":
                assert right == ("the red shape" if red[4] > blue[4] else "the blue shape")
            elif right in ("left", "right"):
                assert right == ("left" if red[2] < blue[2] else "right")
            else:
                assert right == ("above" if red[3] < blue[3] else "below")
        else:
            assert S.caption(m["objects"], m["background"]) == s["conversations"][1]["value"]
            parsed = [{"color": c, "shape": sh} for c, sh, *_ in objs]
            assert S.caption(parsed, m["background"]) == s["conversations"][1]["value"]
        if m["task"] != "caption":
            assert m["background"] == "white"


def test_format_and_balance():
    samples = S.generate(240, tasks=S.VQA_TASKS)
    letters = collections.Counter((s["meta"]["task"], s["meta"]["answer"]) for s in samples)
    for task, n in S.NUM_CHOICES.items():
        counts = [letters[(task, f"({L})")] for L in S.LETTERS[:n]]
        assert max(counts) - min(counts) <= 1 and sum(counts) == 80
        assert S.CHANCE[task] == pytest.approx(1 / n)
    s = samples[0]
    user = s["conversations"][0]["value"]
    assert user.startswith("<image>\n") and user.endswith("\n" + S.INSTRUCTION)
    assert "\n(A) " in user and "\n(B) " in user and s["conversations"][1]["value"] in ("(A)", "(B)", "(C)", "(D)")
    sizes = {tuple(x["meta"]["size"]) for x in samples}
    assert {(320, 176), (176, 320), (256, 144)} <= sizes
    assert S.is_correct("(B)", "(B)") and S.is_correct("The answer is b.", "(B)") and not S.is_correct("A", "(B)")


def test_deterministic_and_split_by_seed():
    a, b = S.sample(7, "train"), S.sample(7, "train")
    assert a["conversations"] == b["conversations"] and a["image"].tobytes() == b["image"].tobytes()
    assert [x["image"].tobytes() for x in S.generate(3, start=5)] == [x["image"].tobytes() for x in S.generate(8)[5:]]
    test = S.sample(7, "test")
    assert test["image"].tobytes() != a["image"].tobytes()
    assert S.sample(7, "train", seed=1)["image"].tobytes() != a["image"].tobytes()


def test_write_jsonl_and_vocabulary(tmp_path):
    path = S.write(str(tmp_path), 12, "test", S.TASKS)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 12
    for row in rows:
        img = Image.open(tmp_path / row["image"])
        assert img.format == "PNG" and list(img.size) == row["meta"]["size"]
    # Every piece of every generated text is in the exported vocabulary (one token each).
    vocab = set(S.vocabulary())
    texts = [t["value"].replace("<image>", "") for s in S.generate(200, tasks=S.TASKS) for t in s["conversations"]]
    assert set(pieces(texts)) <= vocab
    tok = S.build_tiny_tokenizer(str(tmp_path / "tok"))
    assert len(tok) <= 640
    for text in texts[:50]:
        assert all(tok.token_to_id(p) is not None for p in pieces([text]))


def test_image_size_and_background_say_nothing_about_the_answer():
    # Both are drawn before the task's layout, so they are the same whatever the task and answer;
    # a blanked image keeps its size (and padding masks), so this is what keeps the blind score at chance.
    for i in range(24):
        metas = [S.sample(i, tasks=(t,))["meta"] for t in S.VQA_TASKS]
        assert len({(tuple(m["size"]), m["background"]) for m in metas}) == 1
