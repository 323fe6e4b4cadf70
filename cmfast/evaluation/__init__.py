"""Sample-quality evaluation: FID and friends (torch-fidelity), the digits feature space, the time-point search."""

from .classifier import DigitsClassifier, load_classifier, train_classifier
from .frechet import frechet_distance, gaussian_statistics, load_statistics, save_statistics
from .metrics import DigitsFeatures, InceptionFeatures, Reference, compute_metrics, feature_space, reference_for
from .search import greedy_time_points, ternary_search

__all__ = [
    "DigitsClassifier",
    "DigitsFeatures",
    "InceptionFeatures",
    "Reference",
    "compute_metrics",
    "feature_space",
    "frechet_distance",
    "gaussian_statistics",
    "greedy_time_points",
    "load_classifier",
    "load_statistics",
    "reference_for",
    "save_statistics",
    "ternary_search",
    "train_classifier",
]
