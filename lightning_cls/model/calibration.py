"""Calibration by temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

A fine-tuned classifier's probabilities are usually over-confident: among the texts it gives 0.95, fewer than 95% are
right. One scalar T > 0, fitted on the validation split by minimising the NLL of softmax(logits / T), fixes most of
that without changing any prediction (dividing by T keeps the argmax). A label-set model's sigmoids are scaled the
same way, sigmoid(logits / T), and its thresholds are fitted after, on the scaled probabilities
(`lightning_cls.task.LabelSet`). This module holds the pure parts: the fit, the
scores (ECE with fixed bins, NLL, Brier), the before/after report, the reliability diagram and the helper that turns
logits into calibrated probabilities at inference. The model fits T during `fit` (`model.classifier`); `calibrate`
refits it for any checkpoint.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_cls.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# ECE depends on the binning; 15 equal-width bins is the usual choice since Guo et al., so numbers compare across runs.
ECE_BINS = 15
# Bounds of the fitted T: separable (all-right, confident) data drives the NLL optimum towards T -> 0, and a constant
# model's towards T -> infinity; beyond these the probabilities no longer change in any way that matters.
T_MIN, T_MAX = 1e-2, 1e2


def _numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(dtype)


def _check(probs_or_logits: np.ndarray, labels: np.ndarray) -> None:
    if probs_or_logits.ndim != 2 or len(probs_or_logits) != len(labels):
        raise ValueError(
            f"Expected (N, num_labels) scores and N labels, got shapes {probs_or_logits.shape} and {labels.shape}."
        )


def calibrated_probabilities(logits: torch.Tensor | np.ndarray, temperature: float | None) -> Any:
    """softmax(logits / temperature) over the last axis, as a tensor for a tensor and an array for an array.

    `temperature` is the one stored in a checkpoint or in an export's `lightning_cls.json`; None (a model never
    calibrated) gives the plain softmax.
    """
    t = 1.0 if temperature is None else temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise InputError(f"temperature={temperature!r}: a temperature must be a positive finite number.")
    if isinstance(logits, torch.Tensor):
        return (logits.float() / t).softmax(-1)  # (B, num_labels)
    z = np.asarray(logits, dtype=np.float64) / t
    z = np.exp(z - z.max(-1, keepdims=True))  # shifted: exp never overflows
    return z / z.sum(-1, keepdims=True)


def fit_temperature(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, max_iter: int = 100) -> float:
    """The T > 0 that minimises the mean NLL of the probabilities of logits / T on these rows (validation rows,
    never test): softmax cross-entropy for class ids (N,), each label's binary cross-entropy for multi-hot label
    sets (N, C) (one T shared by every label's sigmoid: a label set's model is over-confident as a whole, and one
    scalar cannot over-fit a label with few positives).

    LBFGS on log T (so T stays positive and the steps are scale-free), in float64. Both NLLs are convex in 1/T, so
    the one minimum is found from T = 1; it is clamped to [T_MIN, T_MAX] (see there).
    """
    # Lightning's `validate` runs its hooks in inference mode, where nothing can be differentiated: leave it.
    with torch.inference_mode(False), torch.enable_grad():
        z = torch.as_tensor(_numpy(logits))  # (N, C) float64
        label_sets = np.ndim(labels) == 2
        y = torch.as_tensor(_numpy(labels, np.float64 if label_sets else np.int64))  # (N,) or (N, C)
        if label_sets:
            if z.shape != y.shape:
                raise ValueError(
                    f"Expected (N, C) logits and label sets, got shapes {tuple(z.shape)} and {tuple(y.shape)}."
                )
            nll = torch.nn.functional.binary_cross_entropy_with_logits
        else:
            _check(z.numpy(), y.numpy())
            nll = torch.nn.functional.cross_entropy
        if len(z) == 0:
            raise ValueError("No rows to fit a temperature on.")
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12
        )
        bounds = math.log(T_MIN), math.log(T_MAX)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            # Clamped inside the loss: past a bound the gradient is 0 and LBFGS stops instead of running off to inf.
            loss = nll(z / log_t.clamp(*bounds).exp(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        t = float(log_t.detach().clamp(*bounds).exp())
    return t if math.isfinite(t) else 1.0


# ------------------------------------------------------------------------------------------------ scores
def reliability_bins(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Rows per confidence bin (the top probability, `bins` equal-width bins of (0, 1]), their mean confidence and
    their accuracy (0 for empty bins)."""
    p, y = _numpy(probs), _numpy(labels, np.int64)
    _check(p, y)
    confidence, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    # Bin i holds (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur (the top of a softmax is >= 1/C).
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    sums = np.bincount(index, weights=confidence, minlength=bins)
    hits = np.bincount(index, weights=correct, minlength=bins)
    nonzero = np.maximum(counts, 1)
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1),
        "count": counts,
        "confidence": sums / nonzero,
        "accuracy": hits / nonzero,
    }


def expected_calibration_error(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """ECE: the row-weighted mean gap between accuracy and mean confidence over equal-width confidence bins."""
    b = reliability_bins(probs, labels, bins)
    total = b["count"].sum()
    return float((b["count"] * np.abs(b["accuracy"] - b["confidence"])).sum() / total) if total else 0.0


def negative_log_likelihood(probs: Any, labels: Any) -> float:
    """Mean -log p(true label): a proper scoring rule, unlike ECE it cannot be gamed by predicting the base rate."""
    p, y = _numpy(probs), _numpy(labels, np.int64)
    _check(p, y)
    if len(y) == 0:
        return 0.0
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None)).mean())  # clipped: a hard 0 gives inf


def brier_score(probs: Any, labels: Any) -> float:
    """Mean over rows of the squared distance between the probabilities and the one-hot label (0 best, 2 worst)."""
    p, y = _numpy(probs), _numpy(labels, np.int64)
    _check(p, y)
    if len(y) == 0:
        return 0.0
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def calibration_scores(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, float]:
    p = _numpy(probs)
    return {
        "ece": expected_calibration_error(p, labels, bins),
        "nll": negative_log_likelihood(p, labels),
        "brier": brier_score(p, labels),
        "mean_confidence": float(p.max(1).mean()) if len(p) else 0.0,
    }


def calibration_report(logits: Any, labels: Any, temperature: float | None, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE, NLL, Brier and mean confidence before (T = 1) and after dividing the logits by `temperature`.

    Accuracy is the same on both sides: dividing by T > 0 keeps every argmax.
    """
    z, y = _numpy(logits), _numpy(labels, np.int64)
    _check(z, y)
    before = calibrated_probabilities(z, None)
    return {
        "temperature": temperature,
        "bins": bins,
        "rows": len(y),
        "accuracy": float((z.argmax(1) == y).mean()) if len(y) else 0.0,
        "before": calibration_scores(before, y, bins),
        "after": calibration_scores(calibrated_probabilities(z, temperature), y, bins),
    }


def format_calibration(report: dict[str, Any], source: str = "") -> str:
    """The report as a small fixed-width table (for the text reports)."""
    t = report["temperature"]
    head = f"temperature {t:.4f}" if t is not None else "no temperature (T = 1)"
    head += f" ({source})" if source else ""
    out = [
        f"calibration, {report['rows']} rows, {head}, ECE over {report['bins']} bins:",
        f"{'':<16}  {'ECE':>8}  {'NLL':>8}  {'Brier':>8}  {'confidence':>10}",
    ]
    for side in ("before", "after"):
        s = report[side]
        name = f"{side} scaling"
        out.append(f"{name:<16}  {s['ece']:>8.4f}  {s['nll']:>8.4f}  {s['brier']:>8.4f}  {s['mean_confidence']:>10.4f}")
    out.append(f"{'accuracy':<16}  {report['accuracy']:>8.4f}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ figure
def reliability_figure(
    logits: Any, labels: Any, temperature: float | None, bins: int = ECE_BINS, title: str = ""
) -> Figure:
    """Reliability diagrams before (T = 1) and after scaling side by side: accuracy per confidence bin against the
    diagonal of perfect calibration, the gap to each bin's mean confidence shaded, and the rows per bin below.

    Built on the Agg canvas directly (no pyplot), like `evaluation.confusion_figure`.
    """
    # Imported here: the model imports this module, and code that only needs the model should not load matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    z, y = _numpy(logits), _numpy(labels, np.int64)
    fig = Figure(figsize=(10, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True, height_ratios=[3, 1])
    t_text = f"T = {temperature:.3f}" if temperature is not None else "no temperature: T = 1"
    for column, (name, t) in enumerate((("before scaling (T = 1)", None), (f"after scaling ({t_text})", temperature))):
        probs = calibrated_probabilities(z, t)
        b = reliability_bins(probs, y, bins)
        centres, width = (b["edges"][:-1] + b["edges"][1:]) / 2, 1.0 / bins
        filled = b["count"] > 0
        top, bottom = axes[0, column], axes[1, column]
        top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
        top.bar(centres[filled], b["accuracy"][filled], width=width, edgecolor="black", label="accuracy")
        gap = b["confidence"][filled] - b["accuracy"][filled]
        top.bar(
            centres[filled],
            gap,
            bottom=b["accuracy"][filled],
            width=width,
            color="tab:red",
            alpha=0.3,
            hatch="//",
            label="gap to mean confidence",
        )
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
        top.set_title(f"{name}\nECE {expected_calibration_error(probs, y, bins):.4f}", fontsize=10)
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(centres, b["count"], width=width, color="tab:grey", edgecolor="black")
        for x, n in zip(centres[filled], b["count"][filled], strict=True):
            bottom.text(x, n, str(int(n)), ha="center", va="bottom", fontsize=6)
        bottom.set(xlabel="confidence (top probability)", ylabel="rows")
        bottom.set_ylim(0, max(int(b["count"].max()), 1) * 1.25)  # room for the counts above the bars
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------ collecting logits
class EpochLogits(Metric):
    """Every row's logits, label and row id over an evaluation epoch, for the per-text metrics and calibration:
    `compute` gathers them from all ranks (torchmetrics pads and concatenates uneven per-rank counts), so every rank
    sees the whole split."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("row_ids", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, row_ids: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())  # (B, num_labels)
        self.labels.append(labels.detach())
        self.row_ids.append(row_ids.detach().to(labels.device))  # the text of each row (a text may be several windows)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not len(self.logits):  # no batch on any rank
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return dim_zero_cat(self.logits), dim_zero_cat(self.labels).long(), dim_zero_cat(self.row_ids).long()
