"""The lexical expert: TF-IDF over word 1-2 grams (sublinear tf) and a multinomial logistic regression (one binary
regression per label for multi-label data), the baseline that a fine-tuned encoder must beat, kept as part of the
model so that its class scores can be fused with the neural head's (`lightning_cls.model.fusion`).

It is stored as arrays only, never as a pickle: the vocabulary (the n-grams, newline-separated UTF-8 bytes), the
idf weights, and the classifier's coefficients and intercepts. In a checkpoint they are a dict of tensors (torch's
weights-only loader reads it); in an exported folder one safetensors file, `lexical.safetensors`, whose SHA-256 and
labels `lightning_cls.json` records, so that a missing, truncated or swapped file is refused before any text is
scored. Loading runs no code from the folder.

scikit-learn fits it and rebuilds the vectorizer from the arrays (`TfidfVectorizer(vocabulary=...)` with the stored
`idf_`), so fitting and scoring tokenize the same way: lowercased, words of two or more word characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.imports import RequirementCache

from lightning_cls.data.token_cache import file_fingerprint as sha256  # SHA-256 of a file's bytes
from lightning_cls.errors import ConfigError, InputError

LEXICAL_FILE = "lexical.safetensors"
# Bump when a reader of an older version would misread the arrays.
LEXICAL_VERSION = 1
_SKLEARN = RequirementCache("scikit-learn")


def _require_sklearn() -> None:
    if not _SKLEARN:
        raise ConfigError(f"The lexical expert needs scikit-learn: pip install 'lightning_cls[lexical]'. ({_SKLEARN})")


@dataclass(frozen=True)
class LexicalSettings:
    """How the expert is fitted (`model.lexical_*`): the baseline's settings, which picked C = 16 on validation on
    both whole-data splits (experiments/tfidf_full)."""

    max_features: int = 300_000
    min_df: int = 2
    C: float = 16.0
    max_iter: int = 2000


class LexicalExpert:
    """TF-IDF (word 1-2 grams, sublinear tf) + a linear classifier: `scores(texts)` -> (N, num_labels) logits."""

    def __init__(self, vocabulary: list[str], idf: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> None:
        if not (len(vocabulary) == len(idf) == coef.shape[1]) or coef.shape[0] != len(intercept):
            raise ValueError(
                f"lexical arrays disagree: {len(vocabulary)} n-grams, {len(idf)} idf weights, coefficients "
                f"{tuple(coef.shape)}, {len(intercept)} intercepts"
            )
        self.vocabulary = vocabulary
        self.idf = np.asarray(idf, dtype=np.float32)
        self.coef = np.ascontiguousarray(coef, dtype=np.float32)  # (num_labels, features)
        self.intercept = np.asarray(intercept, dtype=np.float32)  # (num_labels,)
        self._vectorizer = None

    @property
    def num_labels(self) -> int:
        return len(self.intercept)

    # ------------------------------------------------------------------------------------------------ fit, score
    @classmethod
    def fit(cls, texts: list[str], labels: np.ndarray, num_labels: int, settings: LexicalSettings) -> LexicalExpert:
        """Fit on the training split's texts and their class ids (N,): one multinomial logistic regression, softmax
        of its logits the probabilities; or their multi-hot label sets (N, num_labels): one binary logistic regression
        per label (one-vs-rest), the sigmoid of each logit that label's probability. Every class (every label, and
        its absence) must occur."""
        _require_sklearn()
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels)
        if labels.ndim == 2:
            counts = labels.sum(0)
            missing = [i for i in range(num_labels) if counts[i] in (0, len(labels))]
            what = "every text or none"
        else:
            missing = sorted(set(range(num_labels)) - set(np.unique(labels).tolist()))
            what = "no text"
        if missing:
            raise ConfigError(f"model.lexical: the training split has {what} of the label ids {missing}.")
        vectorizer = _vectorizer(min_df=settings.min_df, max_features=settings.max_features)
        features = vectorizer.fit_transform(texts)
        vocabulary = vectorizer.get_feature_names_out().tolist()  # in column order
        if labels.ndim == 2:
            fitted = [
                LogisticRegression(C=settings.C, max_iter=settings.max_iter).fit(features, labels[:, i])
                for i in range(num_labels)
            ]
            coef = np.concatenate([f.coef_ for f in fitted])  # (num_labels, features): each label's own logit
            intercept = np.concatenate([f.intercept_ for f in fitted])
            return cls(vocabulary, vectorizer.idf_, coef, intercept)
        classifier = LogisticRegression(C=settings.C, max_iter=settings.max_iter).fit(features, labels)
        return cls(vocabulary, vectorizer.idf_, classifier.coef_, classifier.intercept_)

    def features(self, texts: list[str]) -> Any:
        """The texts' TF-IDF rows (N, features), a sparse matrix with L2-normalised rows: what `scores` weighs (and
        `export.explain` splits into each n-gram's share)."""
        if self._vectorizer is None:
            _require_sklearn()
            self._vectorizer = _vectorizer(vocabulary={term: i for i, term in enumerate(self.vocabulary)})
            self._vectorizer.idf_ = self.idf
        return self._vectorizer.transform(texts)

    def scores(self, texts: list[str]) -> np.ndarray:
        """The classifier's logits (N, num_labels), float32: softmax of them is its probabilities."""
        return np.asarray(self.features(texts) @ self.coef.T, dtype=np.float32) + self.intercept

    # ------------------------------------------------------------------------------------------------ storage
    def state(self) -> dict[str, torch.Tensor]:
        """The arrays as tensors (a checkpoint's entry; what `save` writes)."""
        return {
            "vocabulary": torch.frombuffer(bytearray("\n".join(self.vocabulary).encode()), dtype=torch.uint8),
            "idf": torch.from_numpy(self.idf),
            "coef": torch.from_numpy(self.coef),
            "intercept": torch.from_numpy(self.intercept),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LexicalExpert:
        vocabulary = bytes(state["vocabulary"].numpy()).decode().split("\n")
        return cls(vocabulary, *(np.asarray(state[k].numpy()) for k in ("idf", "coef", "intercept")))

    def save(self, folder: str | Path, labels: list[str]) -> dict[str, Any]:
        """Write `lexical.safetensors` into `folder`; returns its record for `lightning_cls.json` (file, SHA-256,
        labels, features)."""
        from safetensors.torch import save_file

        path = Path(folder) / LEXICAL_FILE
        meta = {"format": "lightning_cls.lexical", "version": str(LEXICAL_VERSION), "labels": json.dumps(labels)}
        save_file(self.state(), str(path), metadata=meta)
        return {"file": LEXICAL_FILE, "sha256": sha256(path), "labels": list(labels), "features": len(self.idf)}

    @classmethod
    def load(cls, folder: str | Path, record: dict[str, Any], labels: list[str]) -> LexicalExpert:
        """The folder's expert, checked against its record in `lightning_cls.json`: a missing, truncated or altered
        file, or one of other labels, raises ``InputError`` naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(folder) / str(record.get("file") or LEXICAL_FILE)
        if not path.is_file():
            raise InputError(
                f"{path} is missing: lightning_cls.json says this model fuses a lexical expert stored there. "
                "Export the checkpoint again."
            )
        if sha256(path) != record.get("sha256"):
            raise InputError(
                f"{path} is not the lexical expert this export wrote (its SHA-256 differs from the one in "
                "lightning_cls.json: truncated, altered or copied from another export). Export the checkpoint again."
            )
        if list(record.get("labels") or []) != list(labels):
            raise InputError(f"{path} was fitted on the labels {record.get('labels')}, not the model's {labels}.")
        try:
            return cls.from_state(load_file(str(path)))
        except (SafetensorError, KeyError, ValueError, UnicodeDecodeError) as err:
            raise InputError(f"{path} cannot be read as a lexical expert ({err}).") from None


def _vectorizer(**kwargs: Any) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32, **kwargs)
