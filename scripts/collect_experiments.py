"""Gather each experiment's recorded results into experiments/NAME/, draw the figure, print the results table.

    python scripts/collect_experiments.py minilm_full minilm_last2 minilm_head minilm_last2_2ep minilm_last2_len256 \
        minilm_last2_len256_1.5ep minilm_last2_lr1e-4 distilbert_scratch gpt2_scratch

For each NAME: copies the newest test report (text, JSON, confusion matrix PNG) from runs/experiments/NAME/ and writes
curve.json (validation macro-F1 per step from TensorBoard, with the estimated CPU-minutes at each point). Then draws
experiments/val_f1_vs_cpu_minutes.png with every run's curve and the TF-IDF baseline, and prints a markdown table.
CPU-minutes at a step = step x (CPU seconds of the whole fit / its steps) / 60: steps cost the same, so this spreads
the measured total (experiments/NAME/timing.json) evenly; it includes the validation passes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tb_scalars import scalars

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS, RUNS = ROOT / "experiments", ROOT / "runs" / "experiments"


def collect(name: str) -> dict:
    out = EXPERIMENTS / name
    reports = sorted((RUNS / name).glob("version_*/test_report.json"), key=lambda p: p.stat().st_mtime)
    if reports:
        for file in reports[-1].parent.glob("test_*"):
            shutil.copy(file, out / file.name)
    timing = json.loads((out / "timing.json").read_text())
    fit_runs = [p for p in sorted((RUNS / name).glob("version_*")) if not (p / "test_report.json").exists()]
    points = scalars(str(fit_runs[-1])).get("val/f1_macro", []) if fit_runs else []
    steps = max((s for s, _, _ in points), default=0) + 1
    cpu_per_step = timing.get("fit_cpu_seconds", timing["fit_seconds"]) / max(steps, 1)
    curve = [
        {"step": s + 1, "cpu_minutes": round((s + 1) * cpu_per_step / 60, 2), "val_f1_macro": round(v, 4)}
        for s, _, v in points
    ]
    (out / "curve.json").write_text(json.dumps(curve, indent=2))
    report = json.loads((out / "test_report.json").read_text()) if (out / "test_report.json").exists() else {}
    return {"name": name, "timing": timing, "curve": curve, "report": report}


def main(names: list[str]) -> None:
    runs = [collect(n) for n in names if (EXPERIMENTS / n / "timing.json").exists()]
    # Two panels: the pretrained runs on a scale that tells them apart, and the from-scratch sanity runs (random
    # weights, far below) with the same baseline line for scale.
    fig, (ax, ax_scratch) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for run in runs:
        if run["curve"]:
            scratch = run["name"].endswith("_scratch")
            (ax_scratch if scratch else ax).plot(
                [p["cpu_minutes"] for p in run["curve"]],
                [p["val_f1_macro"] for p in run["curve"]],
                "x--" if scratch else "o-",
                label=run["name"],
            )
    baseline = EXPERIMENTS / "tfidf_baseline" / "metrics.json"
    b = json.loads(baseline.read_text()) if baseline.exists() else None
    for panel in (ax, ax_scratch):
        if b:
            panel.plot(
                [b.get("cpu_seconds", b["wall_seconds"]) / 60],
                [b["val_f1_macro"]],
                "k*",
                markersize=12,
                label="TF-IDF + logistic regression",
            )
            panel.axhline(b["val_f1_macro"], color="k", linestyle=":", linewidth=0.8)  # the floor to beat
        panel.grid(alpha=0.3)
    ax.set_xlabel("training CPU-minutes (user + system, 2-core machine)")
    ax_scratch.set_xlabel("training CPU-minutes")
    ax.legend(fontsize=8, loc="lower right")
    ax_scratch.legend(fontsize=8, loc="center right")
    ax.set_ylabel("validation macro-F1")
    ax.set_title("Pretrained MiniLM vs TF-IDF (1,997 validation rows)", fontsize=10)
    ax_scratch.set_title("From-scratch sanity runs (random weights)", fontsize=10)
    ax_scratch.set_ylim(0, 0.9)
    fig.tight_layout()
    fig.savefig(EXPERIMENTS / "val_f1_vs_cpu_minutes.png", dpi=120)

    print("| run | test acc | test macro-F1 | best val macro-F1 | fit wall min | fit CPU min |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        t, r = run["timing"], run["report"]
        best = max((p["val_f1_macro"] for p in run["curve"]), default=float("nan"))
        cpu = t.get("fit_cpu_seconds")
        print(
            f"| {run['name']} | {r.get('accuracy', float('nan')):.4f} | {r.get('macro_f1', float('nan')):.4f} | "
            f"{best:.4f} | {t['fit_seconds'] / 60:.1f} | {cpu / 60 if cpu else float('nan'):.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
