"""Accuracy per task, source and type, chance, the CV-Bench score, vision vs blind (spec §8.2).

CV-Bench: accuracy per source, then

    2D = (acc_ADE20K + acc_COCO) / 2        3D = acc_Omni3D        CV-Bench = (2D + 3D) / 2

Chance is the accuracy of guessing uniformly: the mean of 1/len(choices) over multiple-choice items.
"""
from __future__ import annotations

from typing import Iterable, Mapping

CV_BENCH_SOURCES = ("ADE20K", "COCO", "Omni3D")


def _group(records: list[Mapping], key: str) -> dict:
    groups: dict = {}
    for r in records:
        value = r.get(key)
        if value is None:
            continue
        groups.setdefault(str(value), []).append(r)
    return {k: _summary(v) for k, v in sorted(groups.items())}


def _summary(records: list[Mapping]) -> dict:
    n = len(records)
    chances = [r["chance"] for r in records if r.get("chance") is not None]
    return dict(accuracy=sum(bool(r["correct"]) for r in records) / n if n else 0.0, count=n,
                chance=sum(chances) / len(chances) if chances else None)


def cv_bench_score(per_source: Mapping[str, Mapping]) -> dict | None:
    """{ADE20K, COCO, Omni3D, 2D, 3D, score} from per-source accuracies, when all three sources are there."""
    if not all(s in per_source for s in CV_BENCH_SOURCES):
        return None
    acc = {s: per_source[s]["accuracy"] for s in CV_BENCH_SOURCES}
    two_d = (acc["ADE20K"] + acc["COCO"]) / 2
    three_d = acc["Omni3D"]
    return dict(acc, **{"2D": two_d, "3D": three_d, "score": (two_d + three_d) / 2})


def score(records: Iterable[Mapping]) -> dict:
    """records: one per item with 'correct' (bool), 'chance' (float or None), 'task', 'source', 'type'."""
    records = list(records)
    out = _summary(records)
    out = dict(accuracy=out["accuracy"], chance=out["chance"], num_questions=out["count"],
               per_task=_group(records, "task"), per_source=_group(records, "source"), per_type=_group(records, "type"))
    cvb = cv_bench_score(out["per_source"])
    if cvb is not None:
        out["cv_bench"] = cvb
    return out


def combine(vision: Mapping, blind: Mapping | None = None) -> dict:
    """The vision results with the blind run's accuracies beside them ('accuracy_blind', 'cv_bench_blind')."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in vision.items()}
    if blind is None:
        return out
    out["accuracy_blind"] = blind["accuracy"]
    for group in ("per_task", "per_source", "per_type"):
        out[group] = {k: dict(v, accuracy_blind=blind[group].get(k, {}).get("accuracy"))
                      for k, v in vision[group].items()}
    if "cv_bench" in blind:
        out["cv_bench_blind"] = dict(blind["cv_bench"])
    return out


def _fmt(x) -> str:
    return "    —" if x is None else f"{x:5.3f}"


def format_report(results: Mapping, title: str | None = None) -> str:
    """A table: accuracy (and blind accuracy, when run) and chance per task, source, type, overall."""
    blind = "accuracy_blind" in results
    head = f"{'':30s} {'accuracy':>8s}" + (f" {'blind':>7s}" if blind else "") + f" {'chance':>7s} {'n':>6s}"
    lines = [title] if title else []
    lines.append(head)

    def row(name, r):
        s = f"{name[:30]:30s} {_fmt(r['accuracy']):>8s}"
        if blind:
            s += f" {_fmt(r.get('accuracy_blind')):>7s}"
        return s + f" {_fmt(r.get('chance')):>7s} {r.get('count', r.get('num_questions', 0)):6d}"

    for group, label in (("per_task", "task"), ("per_source", "source"), ("per_type", "type")):
        entries = results.get(group) or {}
        if len(entries) > (0 if group == "per_task" else 1):
            for k, v in entries.items():
                lines.append(row(f"{label} {k}", v))
    lines.append(row("all", results))
    if "cv_bench" in results:
        c = results["cv_bench"]
        b = results.get("cv_bench_blind")
        lines.append(f"CV-Bench: 2D {c['2D']:.3f}  3D {c['3D']:.3f}  score ½·((ADE20K + COCO)/2 + Omni3D) = "
                     f"{c['score']:.3f}" + (f"   (blind: 2D {b['2D']:.3f}  3D {b['3D']:.3f}  score {b['score']:.3f})"
                                            if b else ""))
    return "\n".join(lines)
