"""Which combiner of the network and the lexical expert tags best (#33 item 4): the one fusion weight the project
fits today, against a small logistic regression per label over both parts' logits (a weight for each part and a
bias, per label), both fitted on the validation split only.

    python scripts/combiner_study.py --model_dir runs/export_multilabel --config experiments/NAME/config.yaml \
        --data-path ../shared/data/arxiv/scientific_text.csv --out experiments/NAME/combiner.json

The choice is made without fitting and scoring on the same rows (cross-fitting): validation is cut in K folds, each
fold's fused logits come from a combiner fitted on the other folds, the decision rule (label sets: per-label
thresholds, `fit_thresholds`) is fitted on those out-of-fold logits, and the combiner with the better out-of-fold
score is the one chosen. The test split is scored once per combiner, refitted on the whole validation split, to say
whether the choice holds ("keep it only if it wins on test"). Logits come from the export's own answer path
(`ExportedModel.network_logits`, `lexical_scores`), so what is measured is what `serve` would answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from harness import config_split, cpu_name  # the benchmarks' harness: the same split as every benchmark reads

from lightning_cls.export.answer import ExportedModel
from lightning_cls.task.scores import (
    decide,
    fit_thresholds,
    label_ece,
    multilabel_scores,
    task_scores,
    top_label_in_set,
)


def fit_combiner(z: np.ndarray, s: np.ndarray, y: np.ndarray, per_label: bool, steps: int = 200) -> dict:
    """Weights of ``a * z + b * s + c`` minimising the task's negative log-likelihood on these rows: one (a, b) and
    no bias (the project's fusion: w = b / a), or per label a, b and c (a logistic regression per label over both
    parts' logits). ``y``: class ids (N,) (softmax) or multi-hot rows (N, C) (a sigmoid per label)."""
    multi_label = y.ndim == 2
    zt, st = torch.tensor(z, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64 if multi_label else torch.int64)
    shape = (z.shape[1],) if per_label else (1,)
    a, b = torch.ones(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)
    c = torch.zeros(shape if per_label else (1,), dtype=torch.float64)
    params = [p.requires_grad_() for p in (a, b, c)] if per_label else [a.requires_grad_(), b.requires_grad_()]
    nll = torch.nn.functional.binary_cross_entropy_with_logits if multi_label else torch.nn.functional.cross_entropy
    optimizer = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(a * zt + b * st + c, yt)
        loss.backward()
        return loss

    optimizer.step(closure)
    return {"a": a.detach().numpy(), "b": b.detach().numpy(), "c": c.detach().numpy()}


def combine(z: np.ndarray, s: np.ndarray, params: dict) -> np.ndarray:
    return params["a"] * z + params["b"] * s + params["c"]


def out_of_fold(z: np.ndarray, s: np.ndarray, y: np.ndarray, per_label: bool, folds: int, seed: int) -> np.ndarray:
    """Each row's fused logits from a combiner fitted on the other folds."""
    order = np.random.default_rng(seed).permutation(len(y))
    out = np.zeros_like(z, dtype=np.float64)
    for held in np.array_split(order, folds):
        rest = np.setdiff1d(order, held)
        out[held] = combine(z[held], s[held], fit_combiner(z[rest], s[rest], y[rest], per_label))
    return out


def scores(logits: np.ndarray, y: np.ndarray, names: list[str], thresholds: np.ndarray | None) -> dict:
    """The headline scores of fused logits: label sets under ``thresholds``, or one label (the most probable)."""
    if y.ndim == 2:
        probs = 1 / (1 + np.exp(-logits))
        found = multilabel_scores(decide(probs, thresholds), y, names)
        keys = ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "subset_accuracy")
        return {
            **{k: round(found[k], 4) for k in keys},
            "top_label_in_set": round(top_label_in_set(probs, y), 4),
            "mean_label_ece": round(float(label_ece(probs, y).mean()), 4),  # how calibrated: the #33 target
        }
    return {k: round(v, 4) for k, v in task_scores(logits.argmax(1), y).items()}


def study(
    z_val, s_val, y_val, z_test, s_test, y_test, names, folds: int = 5, seed: int = 0, weight: float | None = None
) -> dict:
    """Both combiners: out-of-fold validation scores (what chooses) and test scores after refitting on all of
    validation (what checks the choice). ``weight``: the export's own fusion weight, scored as ``served`` (its
    logits ``z + weight * s``, unscaled: what `serve` answers) beside them."""
    multi_label = y_val.ndim == 2
    key = "micro_f1" if multi_label else "macro_f1"
    out = {"network_alone": {}, "expert_alone": {}}
    for name, per_label in (("one_weight", False), ("per_label_lr", True)):
        oof = out_of_fold(z_val, s_val, y_val, per_label, folds, seed)
        thresholds = fit_thresholds(1 / (1 + np.exp(-oof)), y_val) if multi_label else None
        params = fit_combiner(z_val, s_val, y_val, per_label)
        full_val = combine(z_val, s_val, params)
        test_thresholds = fit_thresholds(1 / (1 + np.exp(-full_val)), y_val) if multi_label else None
        out[name] = {
            "validation_out_of_fold": scores(oof, y_val, names, thresholds),
            "test": scores(combine(z_test, s_test, params), y_test, names, test_thresholds),
            "weights": {k: np.round(v, 4).tolist() for k, v in params.items()},
        }
    alone = {"network_alone": (z_val, z_test), "expert_alone": (s_val, s_test)}
    if weight is not None:
        alone["served"] = (z_val + weight * s_val, z_test + weight * s_test)
    for name, (zv, zt) in alone.items():
        thresholds = fit_thresholds(1 / (1 + np.exp(-zv)), y_val) if multi_label else None
        out[name] = {"test": scores(zt, y_test, names, thresholds)}
    chosen = max(("one_weight", "per_label_lr"), key=lambda n: out[n]["validation_out_of_fold"][key])
    best_test = max(("one_weight", "per_label_lr"), key=lambda n: out[n]["test"][key])
    out["metric"], out["chosen_on_validation"], out["better_on_test"] = key, chosen, best_test
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a fused export (`export` of a `calibrate`d checkpoint)")
    parser.add_argument("--config", required=True, type=Path, help="the experiment's config: its split")
    parser.add_argument("--data-path", help="override data.path of the config")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the study")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    start, cpu_start = time.perf_counter(), time.process_time()
    _, plan = config_split(args.config, args.data_path)
    model = ExportedModel.load(args.model_dir)
    if model.fusion is None:
        raise SystemExit(f"{args.model_dir} fuses no lexical expert: nothing to combine.")
    parts = {}
    for split in ("val", "test"):
        rows = plan.rows[split]
        texts = plan.table["text"].to_numpy()[rows].tolist()
        with torch.inference_mode():
            z = model.network_logits(texts)[0].double().numpy()
        parts[split] = (z, np.asarray(model.lexical_scores(texts), dtype=np.float64), plan.label_ids[rows])
        print(f"{split}: {len(texts)} texts scored ({time.perf_counter() - start:.0f} s)", flush=True)
    result = study(*parts["val"], *parts["test"], list(plan.names), folds=args.folds, weight=model.fusion.weight)
    result.update(
        model_dir=str(args.model_dir),
        config=str(args.config),
        cpu=cpu_name(),
        cpu_minutes=round((time.process_time() - cpu_start) / 60, 1),
        wall_minutes=round((time.perf_counter() - start) / 60, 1),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    key = result["metric"]
    for name in ("network_alone", "expert_alone", "one_weight", "per_label_lr"):
        oof = result[name].get("validation_out_of_fold", {}).get(key)
        print(
            f"{name:14s} test {key} {result[name]['test'][key]:.4f}" + (f"  (val out-of-fold {oof:.4f})" if oof else "")
        )
    print(f"chosen on validation: {result['chosen_on_validation']}; better on test: {result['better_on_test']}")


if __name__ == "__main__":
    main()
