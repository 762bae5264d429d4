"""The whole-data figure: validation macro-F1 against abstracts seen, for the runs on the whole ten-subject data.

    python scripts/plot_full_data.py minilm_mean_full:tfidf_full minilm_mean_full_bytime:tfidf_full_bytime

Each argument is RUN:BASELINE: the validation curve of runs/experiments/RUN/ (every TensorBoard version below it:
a run stopped and resumed with `--ckpt_path last` spans several) and the TF-IDF baseline's validation macro-F1 on
the same rows (experiments/BASELINE/metrics.json), drawn as a line in the run's colour. Writes
experiments/RUN/curve.json (step, abstracts seen, validation macro-F1) and experiments/val_f1_whole_data.png.

The x axis is abstracts seen, not CPU-minutes as in the 20,000-row figure: these runs were stopped, resumed and
shared the machine with other jobs, so their CPU time is not a cost measurement (experiments/README.md says so).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tb_scalars import scalars

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS, RUNS = ROOT / "experiments", ROOT / "runs" / "experiments"


def curve(name: str) -> list[dict]:
    """Validation macro-F1 per step of the fit runs under runs/experiments/NAME/ (all versions: a resumed run goes on
    in a new one); the last value of a step wins (a resumed run validates only at new steps, so there is one)."""
    batch = yaml.safe_load((EXPERIMENTS / name / "config.yaml").read_text())["data"]["batch_size"]
    points: dict[int, float] = {}
    for version in sorted((RUNS / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        logged = scalars(str(version))
        if "train/loss_step" not in logged:
            continue  # a `validate`, `calibrate` or `test` run of a checkpoint: not a point of the training curve
        for step, _, value in logged.get("val/f1_macro", []):
            points[step + 1] = value  # Lightning logs validation at the global step before the increment
    return [{"step": s, "abstracts_seen": s * batch, "val_f1_macro": round(v, 4)} for s, v in sorted(points.items())]


def main(pairs: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for pair in pairs:
        name, _, baseline = pair.partition(":")
        points = curve(name)
        if not points:
            print(f"{name}: no validation points under {RUNS / name}", file=sys.stderr)
            continue
        (EXPERIMENTS / name / "curve.json").write_text(json.dumps(points, indent=2) + "\n")
        split_by = yaml.safe_load((EXPERIMENTS / name / "config.yaml").read_text())["data"].get("split_by")
        label = f"{name} ({f'split by {split_by}' if split_by else 'random split'})"
        (line,) = ax.plot([p["abstracts_seen"] for p in points], [p["val_f1_macro"] for p in points], "o-", label=label)
        if baseline:
            tfidf = json.loads((EXPERIMENTS / baseline / "metrics.json").read_text())["val_f1_macro"]
            ax.axhline(tfidf, color=line.get_color(), linestyle=":", label=f"TF-IDF, same rows ({baseline})")
        print(name, [(p["step"], p["val_f1_macro"]) for p in points])
    ax.set_xlabel("abstracts seen in training (batches of 16)")
    ax.set_ylabel("validation macro-F1")
    ax.set_title("Whole ten-subject data (4,869 validation rows): MiniLM fine-tuning vs TF-IDF", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(EXPERIMENTS / "val_f1_whole_data.png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
