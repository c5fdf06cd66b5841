"""Linear and k-NN probes of frozen embeddings, compared across backbones.

The protocol (``docs/probe.md`` gives it with its sources):

* **Linear probe** (Kornblith, Shlens & Le, CVPR 2019; SimCLR appendix B; DINOv2's
  ``log_regression.py``): L2-regularised multinomial logistic regression fitted with
  L-BFGS by scikit-learn. The inverse regularisation ``C`` is chosen among 45 values
  log-spaced over [1e-6, 1e5] by accuracy on a stratified validation split held out of
  the training data; the model is then refit on train + validation at that ``C`` and
  scored once on the test split.
* **k-NN probe** (DINO, DINOv2 ``knn.py``): cosine similarity of L2-normalised features,
  each of the k nearest training rows voting for its label with weight
  ``exp(similarity / 0.07)``, for k in {10, 20, 100, 200}. FAISS finds the neighbours.

Everything here takes arrays: the caller opens embeddings datasets and wraps each in a
:class:`ProbeInput`. :func:`run_probe` is the entry point; :mod:`embedpipe.report` turns
its :class:`ProbeResults` into ``results.json``, Markdown and HTML.

Backbones are compared on the *same* images: datasets are aligned by id (refused, or
reduced to the common ids when asked), so one stratified, seeded split serves every
backbone, and per-image correctness can be compared with a paired test.

The modules: ``inputs`` (constants, config, datasets), ``linear``, ``knn``, ``stats``,
``results``, ``align`` (checks and id alignment) and ``run``.
"""

from ..config import IdAlignment
from .inputs import (
    DINO_KS,
    DINO_TEMPERATURE,
    KORNBLITH_CS,
    PROVENANCE_KEYS,
    RESULTS_SCHEMA,
    ProbeConfig,
    ProbeInput,
    SplitKind,
)
from .knn import CosineKNNClassifier, knn_vote_scores
from .linear import LinearProbeCV, linear_preprocessing, split_by_id, stratified_split
from .results import DatasetResult, LinearResult, ProbeResults, Sample, SplitSummary
from .run import pretrained_pairs, run_probe
from .stats import (
    SMALL_TEST_SET,
    ClassificationMetrics,
    PairedTest,
    accuracy_ci,
    classification_metrics,
    mcnemar_exact,
)

__all__ = [
    "DINO_KS", "DINO_TEMPERATURE", "KORNBLITH_CS", "PROVENANCE_KEYS", "RESULTS_SCHEMA",
    "ClassificationMetrics", "CosineKNNClassifier", "DatasetResult", "IdAlignment",
    "LinearProbeCV", "LinearResult", "PairedTest", "ProbeConfig", "ProbeInput",
    "ProbeResults", "Sample", "SplitKind", "SplitSummary", "SMALL_TEST_SET", "accuracy_ci",
    "classification_metrics", "knn_vote_scores", "linear_preprocessing", "mcnemar_exact",
    "pretrained_pairs", "run_probe", "split_by_id", "stratified_split",
]
