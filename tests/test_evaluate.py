"""Evaluation (spec §8): answer extraction, the CV-Bench score, readers, the harness end to end.

  extraction     the reference's multiple-choice rules on a table of tricky outputs, per scorer
                 (ADE/COCO strip '.', OMNI also ':' ',' and accepts the option text)
  score          per task / source / type, 2D, 3D and ½·((ADE20K + COCO)/2 + Omni3D) on hand-made
                 predictions, chance, vision vs blind side by side
  readers        a tiny CV-Bench copy written here (generated images; test_2d/test_3d parquet and
                 jsonl + img/) reads the same both ways; the synthetic test split (LLaVA format)
  end to end     `python -m cambrian_jax.evaluate --benchmark cv_bench --blind` on that copy with a
                 tiny random checkpoint: predictions JSONL, results.json, the report
  resume         interrupted after one batch (and a torn last line), re-run: the same report as an
                 uninterrupted run
  settings       OUT/settings.json says what made the predictions; the default --out is per checkpoint
                 and benchmark; another checkpoint (even of the same folder name) or another
                 temperature in the same folder is refused, an older folder without settings.json
                 too; --overwrite starts over; a larger --limit extends the run
  trainer        choice_eval.evaluate_synthetic (the trainer's held-out eval) gives the harness's
                 numbers on the same split, in the trainer's result format
"""
import io
import json
import os

import numpy as np
import pytest

from cambrian_jax import choice_eval, evaluate
from cambrian_jax.cli import InputError
from cambrian_jax.data import synthetic
from cambrian_jax.evaluation import answers, benchmarks, harness, scoring
from cambrian_jax.evaluation.benchmarks import BENCHMARKS, Item
from cambrian_jax.generate import Sampling

# ------------------------------------------------------------------------------------- extraction

# (model output, ground truth, choices, scorer rule, correct?)
TABLE = [
    ("The answer is (B).", "(B)", ["left", "right"], "ade_coco", True),
    ("b", "(B)", ["left", "right"], "ade_coco", True),
    ("B", "(B)", None, "omni", True),
    ("(C) left", "(C)", ["1", "2", "3", "4"], "ade_coco", True),
    ("(C)", "(C)", ["1", "2", "3", "4"], "ade_coco", True),
    ("C.", "(C)", ["1", "2", "3", "4"], "ade_coco", True),
    ("B. left", "(B)", ["right", "left"], "ade_coco", True),
    ("Answer: A", "(A)", ["lamp", "chair"], "omni", True),
    ("  (a)  ", "(A)", ["lamp", "chair"], "omni", True),
    ("The answer is A, the lamp.", "(A)", ["lamp", "chair"], "omni", True),
    ("The answer is: (B).", "(B)", ["lamp", "chair"], "ade_coco", False),   # reference quirk: ':' is extracted
    ("I think it is (B)", "(B)", ["left", "right"], "ade_coco", False),      # first character 'i'
    ("", "(A)", ["left", "right"], "ade_coco", False),
    # OMNI accepts the option text (spec §8.1); the 2D scorers do not.
    ("chair", "(B)", ["lamp", "chair"], "omni", True),
    ("Chair.", "(B)", ["lamp", "chair"], "omni", True),
    ("The answer is chair", "(B)", ["lamp", "chair"], "omni", True),
    ("lamp", "(B)", ["lamp", "chair"], "omni", False),
    ("chair", "(B)", ["lamp", "chair"], "ade_coco", False),
    ("3", "(B)", ["2", "3", "4", "5"], "omni", True),
    ("3", "(B)", ["2", "3", "4", "5"], "ade_coco", False),
]


@pytest.mark.parametrize("output, truth, choices, rule, correct", TABLE)
def test_answer_extraction_table(output, truth, choices, rule, correct):
    assert answers.is_correct_choice(output, truth, choices, rule) is correct


def test_extraction_follows_the_reference_step_by_step():
    assert answers.extract_choice("The answer is (B).") == "b"
    assert answers.extract_choice("The answer is: (B).") == ":"        # "answer is" is tried first
    assert answers.extract_choice("(C) left") == "c"
    assert answers.extract_choice("((b)).") == "b"                      # lstrip/rstrip strip runs
    assert answers.extract_choice("b:", ".") == "b"                     # cut to one character
    assert answers.extract_choice("answer: answer is d") == "d"
    assert answers.answer_letter("(A)") == "a" and answers.answer_letter("D") == "d"
    assert answers.is_correct_short("Two.", "two") and answers.is_correct_short(" yes ", ["no", "Yes"])
    assert not answers.is_correct_short("two cats", "two")


# ------------------------------------------------------------------------------------------ score

def _item(i, source, choices=("x", "y"), answer="(A)", task=None):
    kind = "3D" if source == "Omni3D" else "2D"
    return Item(id=f"{kind}_{i}", prompt="q", answer=answer, choices=list(choices), source=source, type=kind,
                task=task or ("Depth" if kind == "3D" else "Count"))


def test_cv_bench_score_on_hand_made_predictions():
    # ADE20K 3/4, COCO 1/2, Omni3D 2/4 → 2D = (0.75 + 0.5)/2 = 0.625, 3D = 0.5, CV-Bench = 0.5625
    rows = [(_item(0, "ADE20K"), "(A)"), (_item(1, "ADE20K"), "A"), (_item(2, "ADE20K"), "The answer is (A)."),
            (_item(3, "ADE20K"), "B"),
            (_item(4, "COCO", ("1", "2", "3", "4"), "(C)"), "C"), (_item(5, "COCO", ("1", "2", "3", "4"), "(C)"), "3"),
            (_item(6, "Omni3D"), "x"), (_item(7, "Omni3D"), "(A)"), (_item(8, "Omni3D"), "y"),
            (_item(9, "Omni3D", task="Distance"), "B")]
    records = [harness.record_for(it, i, pred, blind=False) for i, (it, pred) in enumerate(rows)]
    r = scoring.score(records)
    assert r["per_source"]["ADE20K"]["accuracy"] == 0.75
    assert r["per_source"]["COCO"]["accuracy"] == 0.5          # "3" is not a letter for the COCO scorer
    assert r["per_source"]["Omni3D"]["accuracy"] == 0.5        # "x" is the right option's text
    assert r["cv_bench"] == {"ADE20K": 0.75, "COCO": 0.5, "Omni3D": 0.5, "2D": 0.625, "3D": 0.5, "score": 0.5625}
    assert r["accuracy"] == 6 / 10 and r["num_questions"] == 10
    assert r["per_type"]["2D"]["count"] == 6 and r["per_type"]["3D"]["accuracy"] == 0.5
    assert r["per_task"]["Distance"] == {"accuracy": 0.0, "count": 1, "chance": 0.5}
    assert r["chance"] == pytest.approx((8 * 0.5 + 2 * 0.25) / 10)
    blind = scoring.score([dict(rec, correct=False) for rec in records])
    both = scoring.combine(r, blind)
    assert both["accuracy"] == 0.6 and both["accuracy_blind"] == 0.0
    assert both["per_source"]["COCO"]["accuracy_blind"] == 0.0 and both["cv_bench_blind"]["score"] == 0.0
    report = scoring.format_report(both)
    assert "source Omni3D" in report and "score ½·((ADE20K + COCO)/2 + Omni3D) = 0.562" in report
    print(report)


# -------------------------------------------------------------------------- a tiny CV-Bench copy

CV_ROWS = [  # (type, task, source, synthetic task)
    ("2D", "Count", "ADE20K", "count"), ("2D", "Relation", "ADE20K", "relation"),
    ("2D", "Count", "COCO", "count"), ("2D", "Relation", "COCO", "relation"),
    ("3D", "Depth", "Omni3D", "depth"), ("3D", "Distance", "Omni3D", "depth"),
    ("3D", "Depth", "Omni3D", "depth"), ("3D", "Distance", "Omni3D", "depth"),
]


def write_cv_bench(folder) -> list[dict]:
    """CV-Bench's public layout with generated images: test_2d/test_3d .parquet (image bytes inside)
    and .jsonl + img/<type>/<task>/<file>.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"2D": [], "3D": []}
    for i, (kind, task, source, synth) in enumerate(CV_ROWS):
        s = synthetic.sample(i, "test", tasks=(synth,))
        m = s["meta"]
        filename = f"img/{kind}/{task.lower()}/{source.lower()}_{i}.png"
        os.makedirs(os.path.join(folder, os.path.dirname(filename)), exist_ok=True)
        s["image"].save(os.path.join(folder, filename))
        buf = io.BytesIO()
        s["image"].save(buf, "PNG")
        rows[kind].append(dict(
            idx=len(rows[kind]), type=kind, task=task, image={"bytes": buf.getvalue(), "path": filename},
            question=m["question"], choices=m["choices"], answer=m["answer"],
            prompt=synthetic.format_prompt(m["question"], m["choices"]), filename=filename, source=source,
            source_dataset=source, source_filename=f"{i}.jpg", target_class=None, target_size=None, bbox=None))
    for kind, rs in rows.items():
        pq.write_table(pa.Table.from_pylist(rs), os.path.join(folder, f"test_{kind.lower()}.parquet"))
        with open(os.path.join(folder, f"test_{kind.lower()}.jsonl"), "w") as f:
            for r in rs:
                f.write(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n")
    return rows["2D"] + rows["3D"]


@pytest.fixture(scope="module")
def cv_bench(tmp_path_factory):
    """(parquet-only folder, jsonl + img/ folder, rows)."""
    import shutil

    both = str(tmp_path_factory.mktemp("cv_bench"))
    rows = write_cv_bench(both)
    parquet = str(tmp_path_factory.mktemp("cv_bench_parquet"))
    for name in ("test_2d.parquet", "test_3d.parquet"):
        shutil.copy(os.path.join(both, name), parquet)
    return parquet, both, rows


def test_cv_bench_reads_the_same_from_parquet_and_from_jsonl(cv_bench):
    pytest.importorskip("pyarrow")
    parquet, jsonl, rows = cv_bench
    a, b = benchmarks.load_items(parquet, "cv_bench"), benchmarks.load_items(jsonl, "cv_bench")
    assert [it.id for it in a] == [it.id for it in b] == [f"{r['type']}_{r['idx']}" for r in rows]
    for x, y, r in zip(a, b, rows):
        assert (x.prompt, x.answer, x.choices, x.task, x.source, x.type) == \
               (y.prompt, y.answer, y.choices, y.task, y.source, y.type) == \
               (r["prompt"], r["answer"], r["choices"], r["task"], r["source"], r["type"])
        assert np.array_equal(np.asarray(x.load_image()), np.asarray(y.load_image()))
    spec = BENCHMARKS["cv_bench"]
    assert (spec.instruction, spec.max_new_tokens) == (
        "Answer with the option's letter from the given choices directly.", 512)
    assert a[0].question(spec.instruction) == rows[0]["prompt"] + "\n" + spec.instruction
    assert a[0].rule == "ade_coco" and a[-1].rule == "omni"


def test_missing_pyarrow_or_files_are_explained(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="test_2d.parquet"):
        benchmarks.load_items(tmp_path, "cv_bench")
    (tmp_path / "test_2d.parquet").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow"):
        benchmarks.load_items(tmp_path, "cv_bench")


# ------------------------------------------------------------------------- the harness, end to end

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tests.test_generate import tiny_checkpoint
    return tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def gen(work):
    from tests.test_generate import tiny_generator
    return tiny_generator(work)


def _strip(results):
    return {k: v for k, v in results.items() if k != "checkpoint"}


def test_cv_bench_end_to_end_with_blind(work, cv_bench, tmp_path, capsys):
    from tests.test_generate import TINY_CONFIG

    parquet, _, rows = cv_bench
    out = tmp_path / "eval"
    results = evaluate.main(["--checkpoint", work, "--config", TINY_CONFIG, "--benchmark", "cv_bench",
                             "--data", parquet, "--out", str(out), "--blind", "--batch-size", "4",
                             "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    print(printed)
    assert "CV-Bench: 2D" in printed and "blind" in printed and "source ADE20K" in printed
    preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
    blind = [json.loads(line) for line in open(out / "predictions_blind.jsonl")]
    assert sorted(p["id"] for p in preds) == sorted(p["id"] for p in blind) == sorted(
        f"{r['type']}_{r['idx']}" for r in rows)
    assert all(not p["blind"] for p in preds) and all(p["blind"] for p in blind)
    for p in preds:
        assert p["correct"] == answers.is_correct(p["prediction"], p["answer"], p["choices"],
                                                  "omni" if p["source"] == "Omni3D" else "ade_coco")
    saved = json.load(open(out / "results.json"))
    assert saved == json.loads(json.dumps(results))
    assert set(results["per_source"]) == {"ADE20K", "COCO", "Omni3D"} and set(results["per_type"]) == {"2D", "3D"}
    c = results["cv_bench"]
    acc = {s: np.mean([p["correct"] for p in preds if p["source"] == s]) for s in ("ADE20K", "COCO", "Omni3D")}
    assert c["score"] == pytest.approx(0.5 * ((acc["ADE20K"] + acc["COCO"]) / 2 + acc["Omni3D"]))
    assert results["accuracy_blind"] == np.mean([p["correct"] for p in blind])
    assert results["chance"] == pytest.approx(np.mean([1 / len(r["choices"]) for r in rows]))
    assert results["settings"]["max_new_tokens"] == 4 and results["settings"]["temperature"] == 0.0
    # Done items are not generated again: a second run only re-scores.
    again = evaluate.main(["--checkpoint", work, "--config", TINY_CONFIG, "--benchmark", "cv_bench", "--data",
                           parquet, "--out", str(out), "--blind", "--batch-size", "4", "--max-new-tokens", "4"])
    assert _strip(again) == _strip(results)
    assert len(open(out / "predictions.jsonl").readlines()) == len(rows)


def _cli_args(checkpoint, data, *extra):
    from tests.test_generate import TINY_CONFIG

    return ["--checkpoint", str(checkpoint), "--config", TINY_CONFIG, "--benchmark", "cv_bench", "--data", str(data),
            "--batch-size", "4", "--max-new-tokens", "2", *extra]


def test_outputs_say_what_made_them(work, cv_bench, tmp_path, monkeypatch, cli_error, caplog):
    """Issue: a second checkpoint (or --temperature 1.5 after a greedy run) in the same folder used
    to report the first run's predictions under its own name. Now the folder's settings.json is
    compared first."""
    import shutil

    from tests.test_generate import TINY_CONFIG

    _, jsonl, rows = cv_bench
    monkeypatch.chdir(tmp_path)
    evaluate.main(_cli_args(work, jsonl, "--limit", "4"))
    out = tmp_path / "eval_results" / os.path.basename(work) / "cv_bench"       # the default --out
    settings = json.loads((out / "settings.json").read_text())
    written = settings["checkpoint"].pop("written")
    assert isinstance(written, int)
    assert settings == {
        "cambrian_jax_eval": 1,
        "checkpoint": {"path": os.path.abspath(work), "kind": "workdir", "stage": 2, "step": 1},
        "config": TINY_CONFIG, "towers": {}, "tokenizer": None, "template": "phi3", "dtype": "float32",
        "image_mode": "pad", "benchmark": "cv_bench", "instruction": BENCHMARKS["cv_bench"].instruction,
        "data": os.path.abspath(jsonl), "max_new_tokens": 2, "temperature": 0.0, "top_p": 1.0, "seed": 42}
    settings["checkpoint"]["written"] = written
    predictions = (out / "predictions.jsonl").read_text()
    assert len(predictions.splitlines()) == 4
    assert json.loads((out / "results.json").read_text())["settings"] == settings

    def untouched():
        assert (out / "predictions.jsonl").read_text() == predictions
        assert json.loads((out / "settings.json").read_text()) == settings

    # Another run's checkpoint, in a folder of the same name (so the same default --out): refused.
    other = tmp_path / "elsewhere" / os.path.basename(work)
    shutil.copytree(work, other)
    code, line = cli_error(evaluate.main, _cli_args(other, jsonl, "--limit", "4"))
    assert code == 2 and "checkpoint.path" in line and str(other) in line and "--overwrite" in line, line
    untouched()
    # Other generation settings: refused, naming the field.
    code, line = cli_error(evaluate.main, _cli_args(work, jsonl, "--limit", "4", "--temperature", "1.5"))
    assert code == 2 and "temperature: 0.0 there, 1.5 now" in line and "another --out" in line, line
    untouched()
    # A folder written before settings.json existed: refused too.
    old = tmp_path / "old"
    old.mkdir()
    (old / "predictions.jsonl").write_text(predictions)
    code, line = cli_error(evaluate.main, _cli_args(work, jsonl, "--out", str(old)))
    assert code == 2 and "no settings.json" in line and "--overwrite" in line, line
    assert sorted(os.listdir(old)) == ["predictions.jsonl"]
    # The same settings with a larger --limit: the run is extended (4 done, 4 generated).
    results = evaluate.main(_cli_args(work, jsonl))
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) and "\n".join(lines[:4]) + "\n" == predictions
    assert results["num_questions"] == len(rows) and results["settings"] == settings
    # --overwrite starts over with the new settings, and says so.
    caplog.clear()
    again = evaluate.main(_cli_args(work, jsonl, "--limit", "4", "--temperature", "1.5", "--overwrite"))
    said = [r.getMessage() for r in caplog.records if "--overwrite" in r.getMessage()]
    assert len(said) == 1 and "starting over" in said[0] and "temperature" in said[0], said
    assert json.loads((out / "settings.json").read_text()) == dict(settings, temperature=1.5)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4 and again["num_questions"] == 4
    assert again["settings"]["temperature"] == 1.5


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_the_same_report(gen, cv_bench, tmp_path):
    _, jsonl, rows = cv_bench
    items = benchmarks.load_items(jsonl, "cv_bench")
    spec = BENCHMARKS["cv_bench"]
    sampling = Sampling(max_new_tokens=4)
    full = harness.evaluate(gen, items, spec, sampling=sampling, out_dir=tmp_path / "full", batch_size=4)

    def stop_after_first(batch, done):
        raise Interrupted

    with pytest.raises(Interrupted):
        harness.evaluate(gen, items, spec, sampling=sampling, out_dir=tmp_path / "cut", batch_size=4,
                         on_batch=stop_after_first)
    path = tmp_path / "cut" / "predictions.jsonl"
    assert len(path.read_text().splitlines()) == 4
    with open(path, "a") as f:                   # killed in the middle of writing a line
        f.write('{"id": "3D_1", "prediction": "(')
    resumed = harness.evaluate(gen, items, spec, sampling=sampling, out_dir=tmp_path / "cut", batch_size=4)
    assert resumed == full
    assert len(path.read_text().splitlines()) == len(rows)
    assert (tmp_path / "cut" / "results.json").read_text() == (tmp_path / "full" / "results.json").read_text()


def test_synthetic_split_and_the_trainer_eval(gen, work, tmp_path):
    """The synthetic test split written as LLaVA JSONL goes through the same harness; the trainer's
    choice_eval gives the same numbers in its own format."""
    from flax import nnx

    from configs import cambrian_tiny

    n = 8
    path = synthetic.write(str(tmp_path / "synth"), n, "test")
    items = benchmarks.load_items(path, "local")
    assert [it.task for it in items][:3] == ["count", "relation", "depth"]
    assert items[0].choices and items[0].answer.startswith("(")
    assert items[0].question(None).endswith(synthetic.INSTRUCTION)
    spec = benchmarks.BenchmarkSpec("synthetic", None, 4)
    from_file = harness.evaluate(gen, items, spec, out_dir=tmp_path / "out", blind=True, batch_size=4)

    config = cambrian_tiny.get_config(f"eval_samples={n}")
    config.data.tokenizer_dir = os.path.join(work, "tokenizer")
    config.eval.batch_size = 4
    model = nnx.merge(gen.graphdef, gen.state)
    r = choice_eval.evaluate_synthetic(config, gen.cfg, model, work)
    assert set(r) >= {"accuracy", "accuracy_blind", "chance", "num_questions", "per_task"}
    assert set(r["per_task"]) == {"count", "relation", "depth"}
    for task, v in r["per_task"].items():
        assert v["chance"] == synthetic.CHANCE[task]
        assert set(v) >= {"accuracy", "accuracy_blind", "chance", "count"}
    for key in ("accuracy", "accuracy_blind", "chance", "num_questions"):
        assert r[key] == from_file[key]
    print(choice_eval.format_results(r))


# ------------------------------------------------------------------- devices and hosts (slow)

DRIVER = """
import os, sys
process_id, processes, devices, port = (int(x) for x in sys.argv[1:5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_default_prng_impl", "unsafe_rbg")
if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=process_id)
import cambrian_jax
from cambrian_jax import evaluate
evaluate.main(sys.argv[5:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("processes, devices", [(1, 2), (2, 2)], ids=["2-devices", "2-processes-x-2-devices"])
def test_sharded_over_devices_and_processes_gives_the_same_predictions(work, cv_bench, tmp_path, processes, devices):
    """The CLI on a simulated multi-device host and on two processes (gloo collectives): batches
    split over all devices, every host generating its rows, host 0 writing: the same predictions as
    the single-device run."""
    import socket
    import subprocess
    import sys

    from tests.test_generate import ROOT, TINY_CONFIG

    _, jsonl, rows = cv_bench
    args = ["--checkpoint", work, "--config", TINY_CONFIG, "--benchmark", "cv_bench", "--data", jsonl,
            "--batch-size", "4", "--max-new-tokens", "4"]
    single = evaluate.main(args + ["--out", str(tmp_path / "single")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(i), str(processes), str(devices), str(port)] + args
                              + ["--out", str(tmp_path / "multi")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    print(logs[0][-1500:])

    def predictions(folder):
        return {r["id"]: r["prediction"] for r in map(json.loads, open(tmp_path / folder / "predictions.jsonl"))}

    assert predictions("multi") == predictions("single")
    multi = json.load(open(tmp_path / "multi" / "results.json"))
    assert _strip(multi) == _strip(json.loads(json.dumps(single)))
