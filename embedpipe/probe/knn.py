"""The k-NN probe: cosine neighbours voting with weight exp(s / T) (DINO, DINOv2).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import LabelEncoder, normalize
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from ..errors import (
    ProbeConfigError,
    ProbeInputError,
)
from .inputs import DINO_TEMPERATURE

logger = logging.getLogger(__name__)


# --- the k-NN probe ------------------------------------------------------------------


def knn_vote_scores(
    similarities: np.ndarray, neighbor_labels: np.ndarray, *, n_classes: int, temperature: float
) -> np.ndarray:
    """DINO's weighted k-NN vote: each neighbour adds exp(similarity / T) to its class.

    ``similarities``: (n, k) float cosine similarities; ``neighbor_labels``: (n, k) int in
    [0, n_classes). Returns (n, n_classes) float64 vote totals. DINOv2 softmax-normalises
    the weights over the neighbours first; that rescales each row by a constant and ranks
    classes identically.
    """
    n = similarities.shape[0]
    weights = np.exp(similarities.astype(np.float64) / temperature)
    cells = (np.arange(n)[:, None] * n_classes + neighbor_labels).ravel()
    votes = np.bincount(cells, weights=weights.ravel(), minlength=n * n_classes)
    return votes.reshape(n, n_classes)


class CosineKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-NN classifier with DINO's similarity-weighted vote, searched exactly with FAISS.

    Rows are L2-normalised, so inner product is cosine similarity; each of the
    ``n_neighbors`` nearest training rows votes exp(similarity / ``temperature``).

    Attributes
    ----------
    classes_ : (K,) ndarray
    train_vectors_ : (n, D) float32, the L2-normalised training rows
    train_labels_ : (n,) int64, their class indices into ``classes_``
    """

    def __init__(self, *, n_neighbors: int = 20, temperature: float = DINO_TEMPERATURE) -> None:
        self.n_neighbors = n_neighbors
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray) -> CosineKNNClassifier:
        """``X``: (n, D) float (searched as float32); ``y``: (n,) labels."""
        X, y = check_X_y(X, y, dtype=np.float32, order="C")
        check_classification_targets(y)
        self.n_features_in_ = X.shape[1]
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        self.train_labels_ = encoder.transform(y).astype(np.int64)
        self.train_vectors_ = normalize(X)
        return self

    def kneighbors(
        self, X: np.ndarray, n_neighbors: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (n, k) float32, decreasing, and row indices (n, k) int64."""
        check_is_fitted(self)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        n_train = self.train_vectors_.shape[0]
        if not 1 <= k <= n_train:
            raise ProbeConfigError(
                f"n_neighbors must be between 1 and the {n_train} training rows, got {k}"
            )
        X = normalize(check_array(X, dtype=np.float32, order="C"))
        if X.shape[1] != self.n_features_in_:
            raise ProbeInputError(
                f"X has {X.shape[1]} features but the classifier holds {self.n_features_in_}"
            )
        return faiss.knn(X, self.train_vectors_, k, metric=faiss.METRIC_INNER_PRODUCT)

    def vote_scores(self, X: np.ndarray, n_neighbors: int | None = None) -> np.ndarray:
        """(n, K) float64 vote totals of the nearest ``n_neighbors`` rows."""
        similarities, indices = self.kneighbors(X, n_neighbors)
        return knn_vote_scores(
            similarities,
            self.train_labels_[indices],
            n_classes=self.classes_.size,
            temperature=self.temperature,
        )

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, K) float64 votes normalised to sum to one per row."""
        scores = self.vote_scores(X)
        return scores / scores.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n,) labels with the largest vote (the first class on ties)."""
        scores = self.vote_scores(X)
        return self.classes_[np.argmax(scores, axis=1)]
