"""Curation: per-source cap, category rebalancing to target ratios, response-format prompts (spec §7.3)."""
import json

import pytest

from cambrian_jax.data import curate as C

SOURCES = {"vqa_a.json": ("General", 500), "vqa_b.json": ("General", 120), "ocr.json": ("OCR", 300),
           "chat.json": ("Language", 400), "count.json": ("Counting", 60)}
RATIOS = {"General": 50.0, "OCR": 25.0, "Language": 15.0, "Counting": 10.0, "Code": 1.0}


@pytest.fixture()
def inputs(tmp_path):
    f1, f2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = []
    for src, (_, n) in SOURCES.items():
        rows += [{"id": f"{src}-{i}", "source": src, "image": "x.jpg",
                  "conversations": [{"from": "human", "value": f"<image>\nQ{i}?"}, {"from": "gpt", "value": "a"},
                                    {"from": "human", "value": "More?"}, {"from": "gpt", "value": "b"}]}
                 for i in range(n)]
    half = len(rows) // 2
    f1.write_text("".join(json.dumps(r) + "\n" for r in rows[:half]) + "{broken\n")
    f2.write_text("".join(json.dumps(r) + "\n" for r in rows[half:]))
    cats = {s: c for s, (c, _) in SOURCES.items()}
    return [str(f1), str(f2)], cats


def test_cap_and_rebalance(inputs, tmp_path):
    files, cats = inputs
    out = tmp_path / "out.jsonl"
    report = C.curate(files, str(out), cats, cap=200, ratios=RATIOS,
                      response_prompts={"vqa_a.json": "short", "ocr.json": "Give it."}, seed=1, verbose=False)
    src = report["sources"]
    assert {s: v["after_cap"] for s, v in src.items()} == {"vqa_a.json": 200, "vqa_b.json": 120, "ocr.json": 200,
                                                          "chat.json": 200, "count.json": 60}
    # Code has no data (ratios renormalised); Counting (60 after the cap, 10 %) limits the total to 600.
    kept = {c: v["kept"] for c, v in report["categories"].items()}
    assert kept == {"General": 300, "OCR": 150, "Language": 90, "Counting": 60, "Code": 0}
    assert report["missing_categories"] == ["Code"] and report["malformed_json"] == 1
    # Inside a category every source keeps the same fraction.
    assert src["vqa_a.json"]["kept"] / 200 == pytest.approx(src["vqa_b.json"]["kept"] / 120, abs=0.01)
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == report["kept"] == 600
    by_src = {}
    for r in rows:
        by_src.setdefault(r["source"], []).append(r)
    assert {s: len(v) for s, v in by_src.items()} == {s: v["kept"] for s, v in src.items()}
    short = C.RESPONSE_PROMPTS["short"]
    for r in by_src["vqa_a.json"]:
        humans = [t["value"] for t in r["conversations"] if t["from"] == "human"]
        assert humans[0].startswith("<image>\nQ") and all(h.endswith("\n" + short) for h in humans)
    assert all(r["conversations"][0]["value"].endswith("?\nGive it.") for r in by_src["ocr.json"])
    assert all(r["conversations"][0]["value"].endswith("?") for r in by_src["chat.json"])
    # Reproducible; another seed picks other samples.
    again = C.curate(files, str(tmp_path / "again.jsonl"), cats, cap=200, ratios=RATIOS, seed=1, verbose=False)
    assert again["sources"] == report["sources"]
    ids = lambda p: [json.loads(line)["id"] for line in open(p)]  # noqa: E731
    assert ids(tmp_path / "again.jsonl") == ids(out)
    C.curate(files, str(tmp_path / "other.jsonl"), cats, cap=200, ratios=RATIOS, seed=2, verbose=False)
    assert ids(tmp_path / "other.jsonl") != ids(out)


def test_prompt_not_doubled_and_unmapped_sources(inputs, tmp_path):
    turns = [{"from": "human", "value": "<image>\nQ?\n" + C.RESPONSE_PROMPTS["short"]}, {"from": "gpt", "value": "a"}]
    assert C.add_response_prompt(turns, C.RESPONSE_PROMPTS["short"]) == turns
    files, cats = inputs
    del cats["ocr.json"]
    with pytest.raises(ValueError, match="ocr.json"):
        C.curate(files, str(tmp_path / "o.jsonl"), cats, verbose=False)


def test_cli_defaults_to_cambrian_7m_ratios(inputs, tmp_path):
    files, cats = inputs
    (tmp_path / "cats.json").write_text(json.dumps(cats))
    report = C.main(["--jsonl", files[0], "--jsonl", files[1], "--out", str(tmp_path / "o.jsonl"),
                     "--categories", str(tmp_path / "cats.json")])
    assert json.loads((tmp_path / "o.jsonl.report.json").read_text())["kept"] == report["kept"]
    pct = {c: v["percent"] for c, v in report["categories"].items() if v["kept"]}
    target = {c: C.CAMBRIAN_7M_RATIOS[c] for c in pct}
    norm = sum(target.values())
    for c in pct:
        assert pct[c] == pytest.approx(100 * target[c] / norm, abs=0.5)


def test_skipped_lines_are_counted_and_reported_with_file_and_line(inputs, tmp_path, capsys):
    files, cats = inputs
    with open(files[1], "a") as f:
        f.write('["not", "a", "sample"]\n')
    report = C.curate(files, str(tmp_path / "o.jsonl"), cats, cap=50, verbose=True)
    assert (report["malformed_json"], report["not_an_object"]) == (1, 1)
    n1 = len(open(files[0]).readlines())
    n2 = len(open(files[1]).readlines())
    assert report["skipped_examples"] == {"malformed_json": [f"a.jsonl:{n1}"], "not_an_object": [f"b.jsonl:{n2}"]}
    err = capsys.readouterr().err
    assert f"malformed json (e.g. a.jsonl:{n1})" in err and f"not an object (e.g. b.jsonl:{n2})" in err
    assert sum(1 for _ in open(tmp_path / "o.jsonl")) == report["kept"]
