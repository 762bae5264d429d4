"""One results file for every recorded experiment, and the README tables made from it (issue #33).

    python scripts/results_table.py collect                                  # writes experiments/results.csv
    python scripts/results_table.py table --task label_sets --split random   # prints a markdown table
    python scripts/results_table.py readme experiments/README.md             # refreshes its tables in place

`collect` reads what each `experiments/NAME/` recorded and writes one row per number: run, task, split, model,
metric, value, cpu_minutes, date, cpu, and the source file the number was read from:

- `config.yaml`: the task (`data.multi_label`: label_sets; `data.label_column: category`: fine_grained; otherwise
  primary_subject), the split (`random`, or `by_time` for `data.split_by: arxiv_id`; a `data.max_samples` subset
  adds its size: `random_20000`) and the model (`minilm`, `distilbert-scratch`, ...). A TF-IDF folder holds the
  `data` section of the config it ran with (`scripts/tfidf_baseline.py` writes it).
- `test_report.json` written by `test` (or the one `test_report_*.json` there, or, lacking any JSON, the accuracy and
  macro-F1 lines of `test_report.txt`); a report with `components` is the fused model (`minilm+lexical`), and its
  lexical expert alone becomes model `lexical` (at a common 0.5 threshold for label sets: `micro_f1_at_0.5`).
- `fused_test_report.json` and `fused/test_report.json`: the fused model that `calibrate --model.lexical true` made.
- `metrics.json` of `scripts/tfidf_baseline.py`: model `tfidf`.
- `timing.json` (`experiments/run.sh`): `fit_cpu_seconds` as CPU-minutes, its date and CPU; `fused/timing.json`
  adds the fusion's CPU time. The validation score of the tested checkpoint is read from its file name.

A missing file is skipped with a note on stderr; a malformed one stops with a one-line error naming it. The tables
between `<!-- results:TASK:SPLIT [models=a,b] [metrics=a,b] -->` and `<!-- /results -->` in a markdown file are
rewritten from the CSV by `readme`; everything outside the markers is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
FIELDS = ("run", "task", "split", "model", "metric", "value", "cpu_minutes", "date", "cpu", "source")

# The columns a task's table shows by default, and how each metric is headed and printed.
TASK_METRICS = {
    "primary_subject": ["macro_f1", "accuracy", "val_macro_f1"],
    "fine_grained": ["macro_f1", "accuracy", "val_macro_f1"],
    "label_sets": ["micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "labels_per_text", "mean_label_ece"],
}
HEADERS = {
    "macro_f1": "test macro-F1",
    "accuracy": "test acc",
    "val_macro_f1": "val macro-F1 (tested checkpoint)",
    "val_micro_f1": "val micro-F1 (tested checkpoint)",
    "micro_f1": "micro-F1",
    "subset_accuracy": "subset accuracy",
    "hamming_loss": "Hamming loss",
    "labels_per_text": "labels per text",
    "mean_label_ece": "mean label ECE",
    "top_label_in_set": "top subject one of the paper's",
    "ece": "ECE",
    "test_rows": "test rows",
    "step": "tested at step",
}
MISSING = "–"

# Where a neural test report's numbers are, by task: CSV metric -> report key (a tuple: a nested key).
SINGLE_REPORT = {
    "accuracy": "accuracy",
    "macro_f1": "macro_f1",
    "ece": ("calibration", "after", "ece"),
    "top_label_in_set": "top_label_in_set",  # with data.subjects_path
}
MULTI_REPORT = {
    "micro_f1": "micro_f1",
    "macro_f1": "macro_f1",
    "subset_accuracy": "subset_accuracy",
    "hamming_loss": "hamming_loss",
    "mean_label_ece": "mean_label_ece",
    "labels_per_text": ("cardinality", "predicted"),
    "micro_precision": "micro_precision",
    "micro_recall": "micro_recall",
    "top_label_in_set": "top_label_in_set",
}
# The TF-IDF script's metrics.json, by task.
SINGLE_TFIDF = {
    "accuracy": "test_acc",
    "macro_f1": "test_f1_macro",
    "val_macro_f1": "val_f1_macro",
    "top_label_in_set": "test_top_label_in_set",
}
MULTI_TFIDF = {
    "micro_f1": "test_f1_micro",
    "macro_f1": "test_f1_macro",
    "subset_accuracy": "test_subset_accuracy",
    "hamming_loss": "test_hamming_loss",
    "mean_label_ece": "test_mean_label_ece",
    "micro_precision": "test_micro_precision",
    "micro_recall": "test_micro_recall",
    "top_label_in_set": "test_top_label_in_set",
    "val_micro_f1": "val_f1_micro",
}
CKPT_SCORE = re.compile(r"-f1(\d+\.\d+)\.ckpt$")
CKPT_STEP = re.compile(r"step(\d+)")
# A marker is a line of its own (a marker quoted inside a sentence is text).
MARKER = re.compile(r"^<!-- results:(?P<spec>[^>\n]*?) -->\n(?P<body>.*?)^<!-- /results -->$", re.S | re.M)
OPEN, CLOSE = re.compile(r"^<!-- results:.*-->$", re.M), re.compile(r"^<!-- /results -->$", re.M)


class ResultsError(ValueError):
    """A recorded file that cannot be read: the message names it."""


def _stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ reading a run
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ResultsError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a YAML mapping, found {type(data).__name__}")
    return data


def describe(data: dict) -> tuple[str, str]:
    """(task, split) of a config's `data` section."""
    column = data.get("label_column") or "label"
    if data.get("multi_label"):
        task = "label_sets"
    elif column == "label":
        task = "primary_subject"
    else:
        task = "fine_grained" if column == "category" else f"label_column_{column}"
    by = data.get("split_by")
    split = "random" if not by else "by_time" if by == "arxiv_id" else f"by_{by}"
    if data.get("max_samples"):
        split += f"_{data['max_samples']}"
    return task, split


def model_name(model: dict) -> str:
    """A short name for a config's `model` section: minilm, distilbert-scratch, gpt2-scratch, ..."""
    path = str(model.get("model_name_or_path") or "")
    model_type = (model.get("model_config") or {}).get("model_type")
    if "MINILM" in path.upper():
        name = "minilm"
    elif model_type:
        name = str(model_type)
    else:
        name = path.rstrip("/").rsplit("/", 1)[-1].lower() or "model"
    return name if model.get("pretrained", True) else f"{name}-scratch"


def _pick(data: dict, key, path: Path, required: bool):
    value = data
    for part in key if isinstance(key, tuple) else (key,):
        if not isinstance(value, dict) or part not in value:
            if required:
                raise ResultsError(f"{path}: no '{'.'.join(key) if isinstance(key, tuple) else key}' in it")
            return None
        value = value[part]
    if value is not None and not isinstance(value, (int, float)):
        raise ResultsError(f"{path}: '{key}' is {value!r}, not a number")
    return value


def _metrics(data: dict, mapping: dict, path: Path, required: Iterable[str]) -> dict:
    required = set(required)
    out = {m: _pick(data, k, path, m in required) for m, k in mapping.items()}
    return {m: v for m, v in out.items() if v is not None}


def _report_metrics(report: dict, task: str, path: Path) -> dict:
    if task == "label_sets":
        out = _metrics(report, MULTI_REPORT, path, ("micro_f1", "macro_f1"))
    else:
        out = _metrics(report, SINGLE_REPORT, path, ("accuracy", "macro_f1"))
    if isinstance(report.get("rows"), int):
        out["test_rows"] = report["rows"]
    return out


def _text_report(path: Path) -> dict:
    """accuracy, macro-F1, rows and checkpoint of a single-label `test_report.txt` (when no JSON was recorded)."""
    report = {}
    for line in path.read_text().splitlines():
        words = line.split()
        if line.startswith("test:") and len(words) > 2 and words[2].startswith("rows"):
            report["rows"] = int(words[1])
            if "checkpoint" in words:
                report["checkpoint"] = words[words.index("checkpoint") + 1]
        elif words[:1] == ["accuracy"] and len(words) == 3:
            report["accuracy"] = float(words[1])
        elif words[:2] == ["macro", "avg"] and len(words) == 6:
            report["macro_f1"] = float(words[4])
    if "accuracy" not in report or "macro_f1" not in report:
        raise ResultsError(f"{path}: no 'accuracy' and 'macro avg' lines in it")
    return report


def _main_report(run_dir: Path, note: Callable[[str], None]) -> tuple[dict, Path] | None:
    """The run's test report: test_report.json, else its one test_report_*.json, else test_report.txt."""
    path = run_dir / "test_report.json"
    if path.is_file():
        return _read_json(path), path
    others = sorted(run_dir.glob("test_report_*.json"))
    if len(others) == 1:
        return _read_json(others[0]), others[0]
    if len(others) > 1:
        note(f"{run_dir}: several test reports ({', '.join(p.name for p in others)}) and no test_report.json; skipped")
        return None
    if (run_dir / "test_report.txt").is_file():
        return _text_report(run_dir / "test_report.txt"), run_dir / "test_report.txt"
    return None


def _checkpoint_values(name: str, val_metric: str) -> dict:
    values = {}
    if step := CKPT_STEP.search(name):
        values["step"] = int(step.group(1))
    if score := CKPT_SCORE.search(name):
        values[val_metric] = float(score.group(1))
    return values


def _minutes(seconds) -> float | None:
    return round(seconds / 60, 2) if isinstance(seconds, (int, float)) else None


def _date(value) -> str:
    return str(value)[:10] if value else ""


def rows_of(run_dir: Path | str, note: Callable[[str], None] = _stderr) -> list[dict]:
    """One row per recorded number of one experiment folder; [] for a folder that records no run."""
    run_dir = Path(run_dir)
    run, experiments = run_dir.name, run_dir.parent
    config, metrics_file = run_dir / "config.yaml", run_dir / "metrics.json"
    if not config.is_file():
        if metrics_file.is_file():
            note(f"{config}: missing, so the task and split of {metrics_file} are unknown; skipped")
        return []
    cfg = _read_yaml(config)
    task, split = describe(cfg.get("data") or {})
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()

    def add(model: str, values: dict, source: Path, cpu_minutes, date: str, cpu: str) -> None:
        for metric, value in values.items():
            if (model, metric) in seen:  # a component repeats a number the model's own report gave
                continue
            seen.add((model, metric))
            rows.append(
                {
                    "run": run,
                    "task": task,
                    "split": split,
                    "model": model,
                    "metric": metric,
                    "value": value,
                    "cpu_minutes": cpu_minutes,
                    "date": date,
                    "cpu": cpu,
                    "source": source.relative_to(experiments).as_posix(),
                }
            )

    if metrics_file.is_file():  # the TF-IDF baseline script's folder
        m = _read_json(metrics_file)
        mapping = MULTI_TFIDF if task == "label_sets" else SINGLE_TFIDF
        values = _metrics(m, mapping, metrics_file, ("micro_f1",) if task == "label_sets" else ("macro_f1",))
        test_rows = (m.get("split_sizes") or {}).get("test")
        if isinstance(test_rows, int):
            values["test_rows"] = test_rows
        add("tfidf", values, metrics_file, _minutes(m.get("cpu_seconds")), _date(m.get("date")), m.get("machine", ""))
        return rows

    timing_file = run_dir / "timing.json"
    timing = _read_json(timing_file) if timing_file.is_file() else {}
    found = _main_report(run_dir, note)
    fused = [p for p in (run_dir / "fused_test_report.json", run_dir / "fused" / "test_report.json") if p.is_file()]
    if found is None and not fused:
        note(f"{run_dir}: no test report (test_report.json) yet; skipped")
        return []
    if not timing:
        note(f"{timing_file}: missing, so its rows have no CPU-minutes, date or CPU")
    base = model_name(cfg.get("model") or {})
    fit_minutes, date, cpu = _minutes(timing.get("fit_cpu_seconds")), _date(timing.get("date")), timing.get("cpu", "")
    val_metric = "val_micro_f1" if task == "label_sets" else "val_macro_f1"
    reports = []
    if found:
        report, path = found
        values = _report_metrics(report, task, path)
        # The tested checkpoint's step and validation score are in its file name (last.ckpt has neither).
        checkpoint = Path(str(report.get("checkpoint") or timing.get("best_checkpoint") or "")).name
        values.update(_checkpoint_values(checkpoint, val_metric))
        model = f"{base}+lexical" if report.get("components") else base
        add(model, values, path, fit_minutes, date, cpu)
        reports.append((report, path, date, cpu))
    for path in fused:
        report = _read_json(path)
        fuse_timing = _read_json(path.parent / "timing.json") if path.parent != run_dir else {}
        fuse_minutes = _minutes(fuse_timing.get("fuse_cpu_seconds"))
        minutes = round(fit_minutes + fuse_minutes, 2) if fit_minutes is not None and fuse_minutes is not None else None
        when, where = _date(fuse_timing.get("date")) or date, fuse_timing.get("cpu") or cpu
        values = _report_metrics(report, task, path)
        step = CKPT_STEP.search(Path(str(fuse_timing.get("checkpoint") or "")).name)  # the network it fused
        if step:
            values["step"] = int(step.group(1))
        add(f"{base}+lexical", values, path, minutes, when, where)
        reports.append((report, path, when, where))
    for report, path, when, where in reports:  # the fused model's parts, each alone (no cost of their own)
        components = report.get("components") or {}
        for part, model in (("neural", base), ("lexical", "lexical")):
            if isinstance(components.get(part), dict):
                values = {
                    (f"{k}_at_0.5" if task == "label_sets" else k): v
                    for k, v in components[part].items()
                    if isinstance(v, (int, float))
                }
                add(model, values, path, None, when, where)
    return rows


# ------------------------------------------------------------------------------------------------ the CSV
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV text, sorted so that the same rows always give the same text."""
    key = ("task", "split", "run", "model", "metric")
    ordered = sorted(({f: _cell(r.get(f)) for f in FIELDS} for r in rows), key=lambda r: tuple(r[k] for k in key))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    return out.getvalue()


def collect(
    experiments_dir: Path | str = EXPERIMENTS, out: Path | str | None = None, note: Callable[[str], None] = _stderr
) -> Path:
    """Write `results.csv` (in `experiments_dir` unless `out` is given) from every run folder; return its path."""
    experiments_dir = Path(experiments_dir)
    rows = [row for d in sorted(experiments_dir.iterdir()) if d.is_dir() for row in rows_of(d, note)]
    path = Path(out) if out else experiments_dir / "results.csv"
    text = to_csv(rows)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def read_csv(path: Path | str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: missing (write it with `python scripts/results_table.py collect`)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ResultsError(f"{path}: expected the columns {','.join(FIELDS)}")
        rows = list(reader)
    for i, row in enumerate(rows, start=2):
        try:
            row["value"] = float(row["value"])
            row["cpu_minutes"] = float(row["cpu_minutes"]) if row["cpu_minutes"] else None
        except ValueError:
            raise ResultsError(f"{path}, line {i}: value {row['value']!r} is not a number") from None
    return rows


# ------------------------------------------------------------------------------------------------ tables
def _fmt(metric: str, value) -> str:
    if value is None:
        return MISSING
    if metric in ("test_rows", "step"):
        return f"{int(value):,}"
    if metric == "labels_per_text":
        return f"{value:.2f}"
    return f"{value:.4f}"


def table(
    rows: list[dict],
    task: str,
    metrics: list[str] | None = None,
    split: str | None = None,
    models: list[str] | None = None,
    link_prefix: str = "",
) -> str:
    """A markdown table of one task (and split): a line per run and model, the baseline first, then by the first
    metric, best first; CPU-minutes, date and the file each number was read from. `link_prefix` leads the
    source links (the path from the markdown file to experiments/)."""
    metrics = metrics or TASK_METRICS.get(task, ["macro_f1", "accuracy"])
    groups: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["task"] != task or (split and r["split"] != split) or (models and r["model"] not in models):
            continue
        g = groups.setdefault((r["run"], r["model"]), {"values": {}, "sources": [], "cpu": None, "date": ""})
        if r["metric"] in metrics:
            g["values"][r["metric"]] = float(r["value"])
            if r["source"] not in g["sources"]:
                g["sources"].append(r["source"])
            cpu = r.get("cpu_minutes")
            g["cpu"] = float(cpu) if cpu not in (None, "") else g["cpu"]
            g["date"] = r.get("date") or g["date"]
    found = {k: g for k, g in groups.items() if g["values"]}
    first = metrics[0]

    def order(item):
        (run, model), g = item
        value = g["values"].get(first)
        return (model != "tfidf", value is None, -(value or 0.0), run, model)

    head = ["run", "model", *(HEADERS.get(m, m) for m in metrics), "fit CPU-min", "date", "read from"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (run, model), g in sorted(found.items(), key=order):
        sources = ", ".join(f"[{s.split('/', 1)[-1]}]({link_prefix}{s})" for s in g["sources"])
        cells = [
            f"[{run}]({link_prefix}{run}/)",
            model,
            *(_fmt(m, g["values"].get(m)) for m in metrics),
            MISSING if g["cpu"] is None else f"{math.floor(g['cpu'] * 10 + 0.5) / 10:.1f}",  # half up: 40.55 -> 40.6
            g["date"] or MISSING,
            sources,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not found:
        empty = [f"no recorded run for {task} / {split or 'any split'}"] + [""] * (len(head) - 1)
        lines.append("| " + " | ".join(empty) + " |")
    return "\n".join(lines) + "\n"


def _parse_spec(spec: str, where: str) -> dict:
    words = spec.split()
    parts = words[0].split(":") if words else []
    if len(parts) != 2 or not all(parts):
        raise ResultsError(f"{where}: a results marker needs TASK:SPLIT, found {spec!r}")
    out = {"task": parts[0], "split": parts[1]}
    for word in words[1:]:
        key, _, value = word.partition("=")
        if key not in ("models", "metrics") or not value:
            raise ResultsError(f"{where}: unknown marker option {word!r} (models=a,b or metrics=a,b)")
        out[key] = value.split(",")
    return out


def refresh_markdown(text: str, rows: list[dict], link_prefix: str = "", where: str = "markdown") -> str:
    """`text` with the table between each results marker and `<!-- /results -->` made again from `rows`."""
    opened = len(OPEN.findall(text))
    if opened != len(MARKER.findall(text)) or len(CLOSE.findall(text)) != opened:
        raise ResultsError(f"{where}: a `<!-- results:... -->` marker without its `<!-- /results -->` (or the reverse)")

    def replace(match: re.Match) -> str:
        line = text.count("\n", 0, match.start()) + 1
        spec = _parse_spec(match.group("spec"), f"{where}, line {line}")
        body = table(rows, spec["task"], spec.get("metrics"), spec["split"], spec.get("models"), link_prefix)
        return f"<!-- results:{match.group('spec')} -->\n{body}<!-- /results -->"

    return MARKER.sub(replace, text)


def refresh_readme(readme: Path | str, csv_path: Path | str | None = None) -> bool:
    """Rewrite the marked tables of a markdown file from results.csv; True when the file changed."""
    readme = Path(readme)
    csv_path = Path(csv_path) if csv_path else EXPERIMENTS / "results.csv"
    prefix = os.path.relpath(csv_path.parent, readme.parent).replace(os.sep, "/")
    prefix = "" if prefix == "." else prefix + "/"
    text = readme.read_text()
    new = refresh_markdown(text, read_csv(csv_path), prefix, str(readme))
    if new != text:
        readme.write_text(new)
    return new != text


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("collect", help="write experiments/results.csv from the run folders")
    p.add_argument("--experiments", type=Path, default=EXPERIMENTS, help="the folder of run folders")
    p.add_argument("--out", type=Path, help="the CSV to write (default: EXPERIMENTS/results.csv)")
    p = sub.add_parser("table", help="print one task's markdown table from results.csv")
    p.add_argument("--task", required=True, help="primary_subject, label_sets or fine_grained")
    p.add_argument("--split", help="random, by_time, random_20000, ... (default: every split)")
    p.add_argument("--metrics", help="comma-separated metric names (default: the task's)")
    p.add_argument("--models", help="comma-separated model names (default: every model)")
    p.add_argument("--csv", type=Path, default=EXPERIMENTS / "results.csv")
    p = sub.add_parser("readme", help="rewrite the tables between results markers of a markdown file")
    p.add_argument("path", type=Path)
    p.add_argument("--csv", type=Path, default=EXPERIMENTS / "results.csv")
    args = parser.parse_args(argv)
    try:
        if args.command == "collect":
            print(f"wrote {collect(args.experiments, args.out)}")
        elif args.command == "table":
            metrics, models = (s.split(",") if s else None for s in (args.metrics, args.models))
            print(table(read_csv(args.csv), args.task, metrics, args.split, models), end="")
        else:
            changed = refresh_readme(args.path, args.csv)
            print(f"{args.path}: {'tables refreshed' if changed else 'already up to date'}")
    except (ResultsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
