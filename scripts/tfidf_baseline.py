"""TF-IDF + linear classifier baseline on exactly the data module's split (same labels, subsample and seed).

    python scripts/tfidf_baseline.py --config experiments/minilm_full/config.yaml \
        --data-path ../shared/data/arxiv/scientific_text.csv --out experiments/tfidf_baseline

The regularisation strength is picked on the validation split; the test split is scored once at the end.
A multi-label config (`data.multi_label`) gets the one-vs-rest baseline: a binary logistic regression per label
(scikit-learn's OneVsRestClassifier), per-label thresholds fitted on validation as the model's are
(`multilabel.fit_thresholds`), scored with the model's own multi-label metrics.

With --out, the folder also gets `config.yaml`: the `data` section it ran with (its task and split, read by
`scripts/results_table.py`), and experiments/results.csv is refreshed (`results_table.collect`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, classification_report, f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import config_split, cpu_name  # the benchmarks' harness: the same split as every benchmark reads
from results_table import EXPERIMENTS, ResultsError, collect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", required=True, type=Path, help="experiment YAML whose `data` section sets the split"
    )
    parser.add_argument("--data-path", help="override data.path of the config")
    parser.add_argument("--out", type=Path, help="folder for metrics.json, report.txt and config.yaml")
    parser.add_argument("--C", type=float, nargs="+", default=[4.0, 16.0, 64.0], help="values tried on val")
    args = parser.parse_args()

    start, cpu_start = time.perf_counter(), time.process_time()
    data, plan = config_split(args.config, args.data_path)
    if args.out:
        write_data_config(args.out, args.config, {**data, "path": args.data_path or data["path"]})
    texts = plan.table["text"].to_numpy()
    x = {name: texts[rows] for name, rows in plan.rows.items()}
    y = {name: plan.label_ids[rows] for name, rows in plan.rows.items()}
    print("split sizes:", {name: len(rows) for name, rows in plan.rows.items()})

    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, max_features=300_000)
    features = {"train": vectorizer.fit_transform(x["train"])}
    features.update({name: vectorizer.transform(x[name]) for name in ("val", "test")})
    if data.get("multi_label"):
        return multi_label(args, plan, features, y, start, cpu_start)
    single_label(args, data, plan, features, y, start, cpu_start)


def single_label(args, data: dict, plan, features, y, start: float, cpu_start: float) -> None:
    """Multinomial logistic regression, C chosen by validation macro-F1."""
    best = None
    for c in args.C:
        clf = LogisticRegression(C=c, max_iter=2000).fit(features["train"], y["train"])
        val_f1 = f1_score(y["val"], clf.predict(features["val"]), average="macro")
        print(f"C={c:g}: val macro-F1 {val_f1:.4f}")
        if best is None or val_f1 > best[0]:
            best = (val_f1, c, clf)
    val_f1, c, clf = best
    pred = clf.predict(features["test"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "model": "tfidf(1-2 grams, sublinear) + logistic regression",
        "C": c,
        "split_sizes": {name: len(rows) for name, rows in plan.rows.items()},
        "val_f1_macro": round(float(val_f1), 4),
        "test_acc": round(float(accuracy_score(y["test"], pred)), 4),
        "test_f1_macro": round(float(f1_score(y["test"], pred, average="macro")), 4),
        **top_subject(args, data, plan, clf.predict_proba(features["test"])),
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "machine": cpu_name(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "per_class": classification_report(y["test"], pred, target_names=plan.names, output_dict=True, digits=4),
    }
    report = classification_report(y["test"], pred, target_names=plan.names, digits=4)
    write_results(args.out, result, report, details="per_class")


def top_subject(args, data: dict, plan, probs) -> dict:
    """With `data.subjects_path`: the share of test texts whose top label is one of the paper's subjects, as the
    model's test report scores it (`lightning_cls.data.paper_subjects`); nothing without it."""
    if not data.get("subjects_path"):
        return {}
    from lightning_cls.data.paper_subjects import read_paper_subjects
    from lightning_cls.task.scores import top_label_in_set

    columns = (data.get("text_column", "text"), data.get("label_column", "label"))
    subjects = data["subjects_path"], data.get("join_column", "arxiv_id"), data.get("subjects_column", "all_categories")
    table = read_paper_subjects(args.data_path or data["path"], *columns, *subjects, plan.names)
    rows = plan.table["row_id"].to_numpy()[plan.rows["test"]]
    return {"test_top_label_in_set": round(top_label_in_set(probs, table[rows]), 4)}


def write_data_config(out: Path, config: Path, data: dict) -> None:
    """`out/config.yaml`: the `data` section this baseline ran with, so that its results know their task and split."""
    out.mkdir(parents=True, exist_ok=True)
    head = f"# The `data` section of {config} that scripts/tfidf_baseline.py ran with (its rows, labels and split).\n"
    (out / "config.yaml").write_text(head + yaml.safe_dump({"data": data}, sort_keys=False))


def write_results(out: Path | None, result: dict, report: str, details: str) -> None:
    """Print the report and the result (less its per-label details); write both into `out` when given, and refresh
    experiments/results.csv."""
    print(report)
    print(json.dumps({k: v for k, v in result.items() if k != details}))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
        (out / "report.txt").write_text(report)
        try:
            print(f"refreshed {collect(EXPERIMENTS)}")
        except ResultsError as e:  # the baseline's own files are written; say what kept the table from refreshing
            print(f"error: results.csv not refreshed: {e}", file=sys.stderr)


def multi_label(args, plan, features, y, start: float, cpu_start: float) -> None:
    """One-vs-rest: a binary logistic regression per label; thresholds (and C, by micro-F1) chosen on validation."""
    from sklearn.multiclass import OneVsRestClassifier

    from lightning_cls.task.scores import (
        decide,
        epoch_report,
        fit_thresholds,
        format_label_set_report,
        multilabel_scores,
    )

    best = None
    for c in args.C:
        clf = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000)).fit(features["train"], y["train"])
        probs = clf.predict_proba(features["val"])
        thresholds = fit_thresholds(probs, y["val"])
        val = multilabel_scores(decide(probs, thresholds), y["val"], plan.names)
        print(f"C={c:g}: val micro-F1 {val['micro_f1']:.4f}, macro-F1 {val['macro_f1']:.4f}")
        if best is None or val["micro_f1"] > best[0]["micro_f1"]:
            best = (val, c, clf, thresholds)
    val, c, clf, thresholds = best
    test = epoch_report(clf.predict_proba(features["test"]), y["test"], plan.names, thresholds)  # as the model's
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "model": "tfidf(1-2 grams, sublinear) + one-vs-rest logistic regression, per-label thresholds from val",
        "C": c,
        "split_sizes": {name: len(rows) for name, rows in plan.rows.items()},
        "val_f1_micro": round(val["micro_f1"], 4),
        "test_f1_micro": round(test["micro_f1"], 4),
        "test_f1_macro": round(test["macro_f1"], 4),
        "test_subset_accuracy": round(test["subset_accuracy"], 4),
        "test_hamming_loss": round(test["hamming_loss"], 4),
        "test_mean_label_ece": round(test["mean_label_ece"], 4),
        # The tagger's view (#33): tags given that are wrong vs subjects missed, and the first suggestion's hit rate.
        "test_micro_precision": round(test["micro_precision"], 4),
        "test_micro_recall": round(test["micro_recall"], 4),
        "test_top_label_in_set": round(test["top_label_in_set"], 4),
        "thresholds": [float(t) for t in thresholds],
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "machine": cpu_name(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "per_label": test["per_label"],
    }
    report = format_label_set_report(test)
    write_results(args.out, result, report, details="per_label")


if __name__ == "__main__":
    main()
