"""prepare: every bad-input case counted under its reason, path escapes refused, resume, conversions."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from cambrian_jax.data import prepare as prep, records
from cambrian_jax.data.records import Skip


def _save(path, img, fmt, **kw):
    img.save(path, fmt, **kw)


def _conv(q="What is shown?", a="A bus."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL with every bad-input case and the image folder it points into."""
    base = tmp_path_factory.mktemp("prep")
    root = base / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    _save(root / "ok.jpg", rgb, "JPEG", quality=90)
    _save(root / "ok.png", rgb, "PNG")
    _save(root / "cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    _save(root / "grey.png", rgb.convert("L"), "PNG")
    _save(root / "rgba.png", rgb.convert("RGBA"), "PNG")
    _save(root / "palette.gif", rgb.convert("P"), "GIF")
    _save(root / "wide16.png", Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)), "PNG")
    _save(root / "tiny.png", Image.new("RGB", (1, 1)), "PNG")
    _save(root / "thin.png", Image.new("RGB", (400, 10)), "PNG")
    _save(root / "big.png", Image.new("RGB", (200, 200)), "PNG")        # over the test's max_pixels
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "corrupt.jpg").write_bytes(b"this is not an image at all")
    (root / "sub").mkdir()
    _save(root / "sub" / "inner.png", rgb, "PNG")
    outside = base / "outside.png"
    _save(outside, rgb, "PNG")
    os.symlink(outside, root / "link_out.png")
    os.symlink(root / "ok.png", root / "link_in.png")

    good = [
        {"id": "jpg", "image": "ok.jpg", "conversations": _conv("<image>\nWhat is shown?")},
        {"id": "png-image-last", "image": "ok.png", "conversations": _conv("What is shown?\n<image>")},
        {"id": "no-placeholder", "image": "sub/inner.png", "conversations": _conv()},
        {"id": "dotdot-inside", "image": "sub/../ok.png", "conversations": _conv()},
        {"id": "link-in", "image": "link_in.png", "conversations": _conv()},
        {"id": "cmyk", "image": "cmyk.jpg", "conversations": _conv()},
        {"id": "grey", "image": "grey.png", "conversations": _conv()},
        {"id": "rgba", "image": "rgba.png", "conversations": _conv()},
        {"id": "palette", "image": "palette.gif", "conversations": _conv()},
        {"id": "wide16", "image": "wide16.png", "conversations": _conv()},
        {"id": "leading-gpt", "image": "ok.png",
         "conversations": [{"from": "gpt", "value": "Hello!"}] + _conv("<image>\nWhat?")},
        {"id": "text-missing", "conversations": _conv()},
        {"id": "text-none", "image": None, "conversations": _conv()},
        {"id": "text-empty", "image": "", "conversations": _conv()},
        {"id": "text-None", "image": "None", "conversations": _conv()},
        {"id": "text-none-str", "image": "none", "conversations": _conv()},
        {"id": "text-nan", "image": "nan", "conversations": _conv()},
        {"id": "multi-turn", "image": "ok.jpg", "conversations": _conv("<image>\nA?") + _conv("B?", "b")},
    ]
    bad = {
        "wrong_field_types": [{"id": "t1", "conversations": "hello"},
                              {"id": "t2", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
                              {"id": "t3", "image": 5, "conversations": _conv()},
                              [1, 2, 3]],
        "unknown_role": [{"id": "r1", "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}],
        "empty_conversations": [{"id": "e1", "conversations": []},
                                {"id": "e2", "conversations": [{"from": "gpt", "value": "only a reply"}]},
                                {"id": "e3", "conversations": [{"from": "human", "value": "q"}]}],
        "non_alternating_turns": [{"id": "n1", "conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "human", "value": "q2"},
                                                                 {"from": "gpt", "value": "a"}]}],
        "multiple_image_tokens": [{"id": "m1", "image": "ok.jpg", "conversations": _conv("<image>\n<image>\nq")}],
        "multiple_images": [{"id": "mi", "image": ["ok.jpg", "ok.png"], "conversations": _conv()}],
        "image_token_without_image": [{"id": "it", "conversations": _conv("<image>\nq")}],
        "missing_image": [{"id": "mis", "image": "nope.jpg", "conversations": _conv()}],
        "image_path_escapes_root": [{"id": "x1", "image": "../outside.png", "conversations": _conv()},
                                    {"id": "x2", "image": str(outside), "conversations": _conv()},
                                    {"id": "x3", "image": "link_out.png", "conversations": _conv()},
                                    {"id": "x4", "image": "sub/../../outside.png", "conversations": _conv()}],
        "unreadable_image": [{"id": "c1", "image": "corrupt.jpg", "conversations": _conv()},
                             {"id": "c2", "image": "sub", "conversations": _conv()}],
        "truncated_image": [{"id": "tr", "image": "truncated.jpg", "conversations": _conv()}],
        "image_too_small": [{"id": "tiny", "image": "tiny.png", "conversations": _conv()}],
        "image_too_large": [{"id": "big", "image": "big.png", "conversations": _conv()}],
        "extreme_aspect_ratio": [{"id": "thin", "image": "thin.png", "conversations": _conv()}],
    }
    lines = [json.dumps(s) for s in good]
    for samples in bad.values():
        lines += [json.dumps(s) for s in samples]
    lines += ['{"id": "broken", "conversations": [', "", "not json at all"]
    jsonl = base / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    expected = {k: len(v) for k, v in bad.items()}
    expected["malformed_json"] = 2
    expected["blank_line"] = 1
    bad_lines = {"broken": len(good) + sum(map(len, bad.values())) + 1}
    return dict(base=base, root=root, jsonl=jsonl, good=good, expected=expected, bad_lines=bad_lines)


LIMITS = prep.Limits(max_pixels=150 * 150)


def _records(out):
    from grain.sources import ArrayRecordDataSource
    files = sorted(str(p) for p in out.glob("*.array_record"))
    src = ArrayRecordDataSource(files)
    return [records.decode_record(src[i]) for i in range(len(src))]


def test_prepare_counts_every_reason_and_resumes(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    summary = prep.prepare([str(corpus["jsonl"])], str(corpus["root"]), str(out), num_shards=3, workers=0,
                           limits=LIMITS)
    assert summary["skipped"] == dict(sorted(corpus["expected"].items()))
    assert summary["written"] == len(corpus["good"])
    assert summary["text_only"] == 6
    assert summary["bytes"] == sum(p.stat().st_size for p in out.glob("*.array_record")) > 0
    assert summary["converted"] == {"mode_CMYK": 1, "mode_L": 1, "mode_RGBA": 1, "mode_P": 1, "format_GIF": 1,
                                    "mode_I;16": 1}
    assert any(f"data.jsonl:{corpus['bad_lines']['broken']}" in e for e in summary["examples"]["malformed_json"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert {k: on_disk[k] for k in ("written", "skipped", "bytes")} == \
        {k: summary[k] for k in ("written", "skipped", "bytes")}
    assert "lines/s" in capsys.readouterr().err

    recs = {r["id"]: r for r in _records(out)}
    assert set(recs) == {s["id"] for s in corpus["good"]}
    for r in recs.values():
        turns = r["conversations"]
        assert turns[0]["from"] == "human" and [t["from"] for t in turns][::2] == ["human"] * ((len(turns) + 1) // 2)
        if r["image"] is None:
            assert "<image>" not in json.dumps(turns)
        else:
            assert turns[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in turns) == 1
            img = Image.open(io.BytesIO(r["image"]))
            assert img.mode == "RGB" and list(img.size) == r["image_size"] and img.format in ("JPEG", "PNG")
    assert recs["png-image-last"]["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert recs["leading-gpt"]["conversations"][0]["from"] == "human"
    assert recs["jpg"]["image"] == (corpus["root"] / "ok.jpg").read_bytes()      # RGB JPEG stored byte for byte
    grey = np.asarray(Image.open(io.BytesIO(recs["grey"]["image"])))
    assert (grey[..., 0] == grey[..., 1]).all()
    wide = np.asarray(Image.open(io.BytesIO(recs["wide16"]["image"])))
    assert wide.max() > 200                                                      # rescaled, not clipped to white

    # Resume: a complete run is skipped entirely; a lost shard is redone; the summary is the same.
    assert prep.prepare([str(corpus["jsonl"])], str(corpus["root"]), str(out), num_shards=3, workers=0,
                        limits=LIMITS, verbose=False) == summary
    (out / "data-00001-of-00003.done.json").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}
    again = prep.prepare([str(corpus["jsonl"])], str(corpus["root"]), str(out), num_shards=3, workers=0,
                         limits=LIMITS, verbose=False)
    assert {k: again[k] for k in ("written", "skipped", "bytes")} == {k: summary[k] for k in ("written", "skipped", "bytes")}
    changed = {n for n, t in mtimes.items() if (out / n).stat().st_mtime_ns != t}
    assert changed == {"data-00001-of-00003.array_record"}
    # Different settings in the same folder are refused.
    with pytest.raises(ValueError, match="different prepare run"):
        prep.prepare([str(corpus["jsonl"])], str(corpus["root"]), str(out), num_shards=4, workers=0, verbose=False)


def test_parallel_shards_match_sequential(corpus, tmp_path):
    seq = prep.prepare([str(corpus["jsonl"])], str(corpus["root"]), str(tmp_path / "a"), num_shards=2, workers=0,
                       limits=LIMITS, verbose=False)
    par = prep.main(["--jsonl", str(corpus["jsonl"]), "--image-root", str(corpus["root"]), "--out", str(tmp_path / "b"),
                     "--num-shards", "2", "--workers", "2", "--max-pixels", str(LIMITS.max_pixels)])
    assert {k: par[k] for k in ("written", "skipped", "bytes")} == {k: seq[k] for k in ("written", "skipped", "bytes")}
    assert [r["id"] for r in _records(tmp_path / "a")] == [r["id"] for r in _records(tmp_path / "b")]


@pytest.mark.parametrize("chunk", [64, 1 << 22])
def test_shard_ranges_cover_every_line_once(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(prep, "_CHUNK", chunk)     # small chunks exercise the line-number checkpoints
    lines = [json.dumps({"i": i, "pad": "x" * (i * 7 % 23)}) for i in range(50)]
    f1, f2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    f1.write_text("\n".join(lines[:30]) + "\n")
    f2.write_text("\n".join(lines[30:]))                                         # no trailing newline
    assert prep.scan(str(f1))[0] == 30 and prep.scan(str(f2))[0] == 20
    for n in (1, 3, 7, 64):
        got = []
        for segments in prep.plan_shards([str(f1), str(f2)], n):
            for f, a, b, line in segments:
                got += [(os.path.basename(f), no, json.loads(text)["i"]) for no, text in prep._lines(f, a, b, line)]
        assert [i for _, _, i in got] == list(range(50))
        assert [(f, no) for f, no, _ in got] == [("a.jsonl", k + 1) for k in range(30)] + [("b.jsonl", k + 1) for k in range(20)]


def test_path_escapes_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "a/../../secret.png", "/etc/passwd"):
        with pytest.raises(Skip) as e:
            prep.resolve_image(bad, os.path.realpath(root))
        assert e.value.reason == "image_path_escapes_root", bad


def test_refused_image_examples_name_the_record_and_its_image(tmp_path):
    """The summary's example says which record and which image file: never PIL's in-memory buffer."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "corrupt.jpg").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rows = [{"id": "c1", "image": "corrupt.jpg", "conversations": _conv()},
            {"id": "t1", "image": "truncated.jpg", "conversations": _conv()},
            {"id": "m1", "image": "nope.jpg", "conversations": _conv()}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = prep.prepare([str(tmp_path / "d.jsonl")], str(root), str(tmp_path / "out"), workers=0, verbose=False)
    ex = summary["examples"]
    assert ex["unreadable_image"] == ["d.jsonl:1: id 'c1', image 'corrupt.jpg': not an image PIL can identify "
                                      "(corrupt, or not an image file)"]
    assert ex["truncated_image"][0].startswith("d.jsonl:2: id 't1', image 'truncated.jpg': ")
    assert ex["missing_image"] == ["d.jsonl:3: id 'm1', image 'nope.jpg': no such file under --image-root"]
    assert "BytesIO" not in json.dumps(summary) and "0x" not in json.dumps(summary)
