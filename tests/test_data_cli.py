"""The data CLIs (prepare, curate, synthetic) on ordinary mistakes: one line, no traceback, exit 2,
nothing written."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from cambrian_jax.data import curate, prepare, synthetic


def _conv(q="<image>\nWhat is shown?", a="A square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _snapshot(root):
    """Every path under root with its size and mtime: 'nothing written' is an unchanged snapshot."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(images / "a.png")
    samples = [{"id": "s1", "image": "a.png", "source": "src_a", "conversations": _conv()},
               {"id": "s2", "source": "src_b", "conversations": _conv("Say hi.", "Hi.")}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "array.json").write_text(json.dumps(samples))
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"id": i, "image": f"x{i}.png", "conversations": _conv()})
                                                 + "\n" for i in range(60)))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cats.json").write_text(json.dumps({"src_a": "General", "src_b": "Language"}))
    (tmp_path / "cats_partial.json").write_text(json.dumps({"src_a": "General"}))
    (tmp_path / "cats_unknown.json").write_text(json.dumps({"src_a": "General", "src_b": "Poetry"}))
    (tmp_path / "broken.json").write_text("{src_a: General")
    (tmp_path / "list.json").write_text('["src_a"]')
    (tmp_path / "ratios_bad.json").write_text(json.dumps({"General": "lots"}))
    (tmp_path / "done").mkdir()
    prepare.prepare([str(tmp_path / "data.jsonl")], str(images), str(tmp_path / "done"), num_shards=1, workers=0,
                    verbose=False)
    return tmp_path


def _argv(defaults, args, b):
    """defaults ({flag: value}) with args' flags replacing or adding to them, as an argv list."""
    argv = dict(defaults)
    for k, v in zip(args[::2], args[1::2]):
        argv[k] = v.format(b=b)
    return [x for kv in argv.items() for x in kv]


def _check(cli_error, main, argv, base, *words):
    before = _snapshot(base)
    code, line = cli_error(main, argv)
    assert code == 2, line
    assert line.startswith("error: "), line
    for w in words:
        assert w in line, (w, line)
    assert _snapshot(base) == before, "something was written"
    return line


PREPARE = [  # (arguments, words the line must hold)
    (["--jsonl", "{b}/missing.jsonl"], ["--jsonl", "missing.jsonl", "does not exist"]),
    (["--jsonl", "{b}/images"], ["--jsonl", "is a folder"]),
    (["--image-root", "{b}/no_such_dir"], ["--image-root", "no_such_dir", "does not exist"]),
    (["--image-root", "{b}/afile"], ["--image-root", "afile", "is a file"]),
    (["--jsonl", "{b}/array.json"], ["array.json", "JSON array", "jq"]),
    (["--image-root", "{b}/done"], ["--image-root", "'a.png'", "data.jsonl:1"]),     # the wrong folder
    (["--jsonl", "{b}/many.jsonl"], ["--image-root", "none of the first 50 images", "'x0.png'", "many.jsonl:1"]),
    (["--out", "{b}/afile"], ["--out", "afile", "is a file"]),
    (["--num-shards", "0"], ["--num-shards"]),
    (["--max-aspect", "0.5"], ["--max-aspect"]),
    (["--out", "{b}/done", "--num-shards", "3"], ["different prepare run", "done"]),
]


@pytest.mark.parametrize("args, words", PREPARE, ids=[" ".join(a) for a, _ in PREPARE])
def test_prepare_mistakes(inputs, cli_error, args, words):
    b = str(inputs)
    defaults = {"--jsonl": f"{b}/data.jsonl", "--image-root": f"{b}/images", "--out": f"{b}/new_out"}
    _check(cli_error, prepare.main, _argv(defaults, args, b), inputs, *words)


CURATE = [
    (["--jsonl", "{b}/missing.jsonl"], ["--jsonl", "missing.jsonl", "does not exist"]),
    (["--categories", "{b}/missing.json"], ["--categories", "missing.json", "does not exist"]),
    (["--categories", "{b}/broken.json"], ["--categories", "broken.json", "not valid JSON"]),
    (["--categories", "{b}/list.json"], ["--categories", "list.json", "not an object"]),
    (["--categories", "{b}/cats_partial.json"], ["'src_b'", "data.jsonl:2", "no category", '"src_b": "General"']),
    (["--categories", "{b}/cats_unknown.json"], ["'Poetry'", "src_b", "no target ratio"]),
    (["--ratios", "{b}/ratios_bad.json"], ["--ratios", "ratios_bad.json", "'General'"]),
    (["--response-prompts", "{b}/missing.json"], ["--response-prompts", "does not exist"]),
    (["--cap", "0"], ["--cap"]),
    (["--out", "{b}/data.jsonl"], ["--out", "one of the --jsonl inputs"]),
    (["--out", "{b}/images"], ["--out", "is a folder"]),
]


@pytest.mark.parametrize("args, words", CURATE, ids=[" ".join(a) for a, _ in CURATE])
def test_curate_mistakes(inputs, cli_error, args, words):
    b = str(inputs)
    defaults = {"--jsonl": f"{b}/data.jsonl", "--out": f"{b}/curated.jsonl", "--categories": f"{b}/cats.json"}
    _check(cli_error, curate.main, _argv(defaults, args, b), inputs, *words)


SYNTHETIC = [
    (["--template", "bogus"], ["--template", "'bogus'", "phi3"]),
    (["--out", "{b}/afile"], ["--out", "afile", "is a file"]),
    (["--num-train", "-1"], ["--num-train", "-1"]),
]


@pytest.mark.parametrize("args, words", SYNTHETIC, ids=[" ".join(a) for a, _ in SYNTHETIC])
def test_synthetic_mistakes(inputs, cli_error, args, words):
    b = str(inputs)
    defaults = {"--out": f"{b}/synth", "--num-train": "2", "--num-test": "1", "--num-caption": "1"}
    _check(cli_error, synthetic.main, _argv(defaults, args, b), inputs, *words)
