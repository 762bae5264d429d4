"""Fusing the neural head with the lexical expert (`lightning_cls.model.lexical`): one weight, fitted on validation.

The fused logits are ``z + w * s``: the neural logits `z` plus `w` times the lexical expert's logits `s`. The
weight `w` is fitted together with a scale on the validation split by minimising the negative log-likelihood of
``a * z + b * s`` (so ``w = b / a``); the temperature of the fused logits is then fitted by the usual temperature
scaling (`model.calibration`), so every later step (calibrated probabilities, abstention, estimated accuracy,
drift) reads the fused output as it read the neural one. Two numbers fitted on thousands of rows: nothing to
overfit, and never fitted on test. Fusing is linear in `z`, so fusing each window of a long text and then averaging
gives what averaging and then fusing gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_cls.errors import InputError
from lightning_cls.model.lexical import LexicalExpert


def fuse(neural: torch.Tensor, lexical: torch.Tensor | np.ndarray, weight: float) -> torch.Tensor:
    """The fused logits (N, num_labels): ``neural + weight * lexical``."""
    lexical = torch.as_tensor(lexical, dtype=torch.float32, device=neural.device)
    return neural.float() + weight * lexical


def fit_fusion_weight(neural: torch.Tensor, lexical: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The lexical weight `w` minimising the NLL of ``a * neural + b * lexical`` over (a, b), as ``w = b / a``.

    `labels` are class ids (N,) (softmax cross-entropy), or multi-hot label sets (N, C) (a sigmoid per label: binary
    cross-entropy)."""
    # Lightning's `validate` runs its hooks in inference mode, where nothing can be differentiated: leave it.
    with torch.inference_mode(False), torch.enable_grad():
        z = torch.tensor(np.asarray(neural.detach().cpu(), dtype=np.float64))  # (N, C)
        s = torch.tensor(np.asarray(torch.as_tensor(lexical).cpu(), dtype=np.float64))  # (N, C)
        multi_label = labels.dim() == 2
        y = torch.tensor(np.asarray(labels.cpu(), dtype=np.float64 if multi_label else np.int64))
        nll = torch.nn.functional.binary_cross_entropy_with_logits if multi_label else torch.nn.functional.cross_entropy
        params = torch.ones(2, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nll(params[0] * z + params[1] * s, y)
            loss.backward()
            return loss

        optimizer.step(closure)
        a, b = params.detach().tolist()
    # An expert that only hurts gets weight 0 (the network's answer alone); a network that knows nothing yet (a <= 0,
    # early in training) a large one, bounded: the expert's answer, nearly alone. The temperature then rescales.
    return max(b, 0.0) / max(a, 1e-3)


def component_scores(
    neural: torch.Tensor, lexical: torch.Tensor, labels: torch.Tensor, weight: float
) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 of the neural head alone, the lexical expert alone and the fusion (the test report
    shows all three). For multi-hot `labels` (N, C): micro- and macro-F1 of each at one threshold, 0.5 for every
    label (the fused model's own per-label thresholds are fitted on its fused scores; the three are compared alike)."""
    # Imported here: the serving workers import this module, and torchmetrics takes seconds to import.
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multilabel_f1_score,
    )

    n, y = neural.shape[-1], labels.cpu()
    parts = {"neural": neural, "lexical": torch.as_tensor(lexical), "fused": fuse(neural, lexical, weight)}
    out = {}
    for name, logits in parts.items():
        if y.dim() == 2:
            probs = logits.float().sigmoid().cpu()
            out[name] = {
                f"{average}_f1": round(float(multilabel_f1_score(probs, y.long(), n, average=average)), 4)
                for average in ("micro", "macro")
            }
            continue
        predicted = logits.argmax(-1).cpu()
        out[name] = {
            "accuracy": round(float(multiclass_accuracy(predicted, y, n, average="micro")), 4),
            "macro_f1": round(float(multiclass_f1_score(predicted, y, n, average="macro")), 4),
        }
    return out


class SplitScores:
    """The lexical expert's logits of one split's texts, scored once and looked up by row id (batches carry row ids,
    not texts: the lexical expert reads the raw text, the network its tokens)."""

    def __init__(self, row_ids: np.ndarray, scores: np.ndarray) -> None:
        order = np.argsort(row_ids, kind="stable")
        self.row_ids, self.scores = np.asarray(row_ids)[order], torch.from_numpy(np.asarray(scores)[order])

    def __getitem__(self, row_ids: torch.Tensor) -> torch.Tensor:
        wanted = row_ids.detach().cpu().numpy()
        at = np.searchsorted(self.row_ids, wanted).clip(max=max(len(self.row_ids) - 1, 0))
        if not len(self.row_ids) or (self.row_ids[at] != wanted).any():
            missing = wanted[self.row_ids[at] != wanted] if len(self.row_ids) else wanted
            raise KeyError(f"the lexical expert has no scores for row ids {missing[:5].tolist()}")
        return self.scores[at].to(row_ids.device)


class FolderFusion:
    """An exported folder's lexical expert and weight: `fused(logits, texts)` gives the fused per-text logits from
    the network's (any backend: PyTorch, ONNX Runtime). `from_folder` is None for a folder without one."""

    def __init__(self, expert: LexicalExpert, weight: float) -> None:
        self.expert, self.weight = expert, float(weight)

    @classmethod
    def from_folder(cls, model_dir: str | Path, metadata: Any) -> FolderFusion | None:
        record = getattr(metadata, "lexical", None)
        if record is None:
            return None
        weight = record.get("weight") if isinstance(record, dict) else None
        if not isinstance(weight, int | float) or not np.isfinite(weight) or weight < 0:
            where = Path(model_dir) / "lightning_cls.json"
            raise InputError(f"{where}: lexical.weight {weight!r} must be a number >= 0.")
        return cls(LexicalExpert.load(model_dir, record, list(metadata.labels)), weight)

    def fused(self, logits: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return fuse(logits, self.expert.scores(texts), self.weight)
