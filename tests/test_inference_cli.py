"""What a person sees when an inference command line is given something it cannot use.

  mistakes   `evaluate` and `generate` on each ordinary mistake (an unknown benchmark, no --data, a
             --data that does not exist or holds no items, a missing or broken image in the data, a
             checkpoint that does not exist, a missing or non-image --image, a bad flag value):
             one line on stderr naming the thing, no traceback, exit 2, nothing written
  chat       `/image` with a missing or non-image path says why and keeps the conversation and its
             image; a good path starts over
  warning    the default max_new_tokens that does not fit after the prompt is cut silently; an
             explicit --max-new-tokens that does not fit is warned about

Every check fails before the model would generate; only the warning test loads the tiny checkpoint.
"""
import io
import os
import shutil

import pytest
from PIL import Image

from cambrian_jax import cli, evaluate, generate
from cambrian_jax.generate import Completion, Sampling
from tests.test_generate import TINY_CONFIG, tiny_checkpoint


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A CV-Bench copy (jsonl + img/), copies with one image missing and one not an image, an empty
    question file, an empty folder, an image and a text file."""
    from tests.test_evaluate import write_cv_bench

    root = tmp_path_factory.mktemp("inputs")
    good = root / "cv_bench"
    rows = write_cv_bench(str(good))
    missing, broken = root / "missing", root / "broken"
    shutil.copytree(good, missing)
    shutil.copytree(good, broken)
    (missing / rows[5]["filename"]).unlink()
    (broken / rows[6]["filename"]).write_bytes(b"this is not a PNG")
    (root / "empty.jsonl").write_text("")
    (root / "nothing").mkdir()
    (root / "notes.txt").write_text("not an image\n")
    ids = [f"{r['type']}_{r['idx']}" for r in rows]
    return dict(root=root, good=good, missing=missing, broken=broken, rows=rows, ids=ids,
                image=good / rows[0]["filename"])


def _evaluate(work, data, *extra):
    args = ["--checkpoint", str(work), "--config", TINY_CONFIG, "--max-new-tokens", "2"]
    return args + (["--data", str(data)] if data is not None else []) + list(extra)


EVALUATE_MISTAKES = {   # name → (argv from (work, inputs), what the line must say)
    "unknown benchmark": (lambda w, i: _evaluate(w, i["good"], "--benchmark", "cvbench"),
                          ["unknown benchmark 'cvbench'", "cv_bench", "mmbench_en"]),
    "no --data": (lambda w, i: _evaluate(w, None), ["--data is required"]),
    "--data does not exist": (lambda w, i: _evaluate(w, i["root"] / "absent"), ["absent does not exist"]),
    "--data empty file": (lambda w, i: _evaluate(w, i["root"] / "empty.jsonl", "--benchmark", "local"),
                          ["empty.jsonl holds no items"]),
    "--data empty folder": (lambda w, i: _evaluate(w, i["root"] / "nothing"), ["no CV-Bench files"]),
    "missing image": (lambda w, i: _evaluate(w, i["missing"]),
                      lambda i: [f"item {i['ids'][5]}", str(i["missing"] / i["rows"][5]["filename"]),
                                 "does not exist"]),
    "not an image": (lambda w, i: _evaluate(w, i["broken"], "--batch-size", "4"),
                     lambda i: [f"item {i['ids'][6]}", str(i["broken"] / i["rows"][6]["filename"]),
                                "not a readable image"]),
    "--checkpoint does not exist": (lambda w, i: _evaluate(i["root"] / "no_run", i["good"]),
                                    ["no_run does not exist", "training workdir"]),
    "bad temperature": (lambda w, i: _evaluate(w, i["good"], "--temperature", "-1"), ["--temperature must be"]),
    "--out is a file": (lambda w, i: _evaluate(w, i["good"], "--out", str(i["root"] / "notes.txt")),
                        ["is a file, not a folder"]),
}


@pytest.mark.parametrize("mistake", list(EVALUATE_MISTAKES))
def test_evaluate_mistakes_end_in_one_line_and_write_nothing(mistake, work, inputs, tmp_path, monkeypatch,
                                                             cli_error):
    argv, says = EVALUATE_MISTAKES[mistake]
    monkeypatch.chdir(tmp_path)                       # the default --out would be under here
    before = {p: os.path.getmtime(p) for p in inputs["root"].rglob("*")}
    code, line = cli_error(evaluate.main, argv(work, inputs))
    assert code == cli.EXIT_BAD_INPUT and line.startswith("error: ")
    for words in (says(inputs) if callable(says) else says):
        assert words in line, line
    assert os.listdir(tmp_path) == []                 # no eval_results/, no partial predictions.jsonl
    assert {p: os.path.getmtime(p) for p in inputs["root"].rglob("*")} == before


GENERATE_MISTAKES = {
    "--checkpoint does not exist": (lambda w, i: ["--checkpoint", str(i["root"] / "no_run"), "--prompt", "hi"],
                                    ["no_run does not exist", "HF-layout"]),
    "--checkpoint is a file": (lambda w, i: ["--checkpoint", str(i["root"] / "notes.txt"), "--prompt", "hi"],
                               ["is a file, not a directory"]),
    "no --checkpoint": (lambda w, i: ["--prompt", "hi"], ["--checkpoint", "--help"]),
    "--image does not exist": (lambda w, i: ["--checkpoint", w, "--config", TINY_CONFIG, "--image",
                                             str(i["root"] / "cat.jpg"), "--prompt", "hi"],
                               ["--image", "cat.jpg does not exist"]),
    "--image is not an image": (lambda w, i: ["--checkpoint", w, "--config", TINY_CONFIG, "--image",
                                              str(i["root"] / "notes.txt"), "--prompt", "hi"],
                                ["notes.txt is not a readable image"]),
    "bad --towers": (lambda w, i: ["--checkpoint", w, "--towers", "siglip", "--prompt", "hi"], ["NAME=DIR"]),
    "bad --max-new-tokens": (lambda w, i: ["--checkpoint", w, "--max-new-tokens", "0", "--prompt", "hi"],
                             ["--max-new-tokens must be"]),
}


@pytest.mark.parametrize("mistake", list(GENERATE_MISTAKES))
def test_generate_mistakes_end_in_one_line(mistake, work, inputs, tmp_path, monkeypatch, cli_error):
    argv, says = GENERATE_MISTAKES[mistake]
    monkeypatch.chdir(tmp_path)
    code, line = cli_error(generate.main, argv(work, inputs))
    assert code == cli.EXIT_BAD_INPUT
    for words in says:
        assert words in line, line
    assert os.listdir(tmp_path) == []


class EchoGenerator:
    """Stands in for a Generator in the chat loop: records what it is asked, answers 'reply N'."""

    def __init__(self):
        self.calls = []

    def generate(self, conversations, images, sampling):
        self.calls.append((list(conversations[0]), images[0]))
        return [Completion([], f"reply {len(self.calls)}", "stop")]


def test_chat_survives_a_bad_image_path(inputs):
    first = Image.new("RGB", (32, 24), (255, 0, 0))
    missing, notes, good = inputs["root"] / "cat.jpg", inputs["root"] / "notes.txt", inputs["image"]
    gen, out = EchoGenerator(), io.StringIO()
    script = f"q1\n/image {missing}\n/image {notes}\nq2\n/image {good}\nq3\n/quit\n"
    generate.chat(gen, first, Sampling(max_new_tokens=2), stdin=io.StringIO(script), stdout=out)
    text = out.getvalue()
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 2, text
    assert str(missing) in errors[0] and "does not exist" in errors[0]
    assert str(notes) in errors[1] and "not a readable image" in errors[1]
    (turns1, image1), (turns2, image2), (turns3, image3) = gen.calls
    assert turns1 == [("human", "q1")] and image1 is first
    assert turns2 == [("human", "q1"), ("gpt", "reply 1"), ("human", "q2")] and image2 is first   # kept
    assert turns3 == [("human", "q3")] and image3.size == Image.open(good).size                   # started over


class Stop(Exception):
    pass


def test_the_default_max_new_tokens_is_cut_silently(work, inputs, tmp_path, monkeypatch, caplog):
    """The tiny model has 512 positions: after a 128-position prompt bucket 384 new tokens fit. The
    default (512, generate's and CV-Bench's) is cut without a warning; --max-new-tokens 512 warns."""
    def stop(*args, **kwargs):
        raise Stop      # the warning comes before the prefill: nothing needs to be compiled

    monkeypatch.setattr(generate, "_prefill", stop)
    monkeypatch.chdir(tmp_path)
    base = ["--checkpoint", work, "--config", TINY_CONFIG, "--image", str(inputs["image"]), "--prompt", "Count."]

    def cut_warnings(argv, main=generate.main):
        caplog.clear()
        with pytest.raises(Stop):
            main(argv)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "cut to" in r.getMessage()]

    assert cut_warnings(base) == []
    evaluate_args = ["--checkpoint", work, "--config", TINY_CONFIG, "--data", str(inputs["good"]), "--limit", "1"]
    assert cut_warnings(evaluate_args, evaluate.main) == []
    said = cut_warnings(base + ["--max-new-tokens", "512"])
    assert len(said) == 1 and "max_new_tokens 512 cut to 384" in said[0], said
