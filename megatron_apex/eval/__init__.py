"""Small-scale benchmark metrics: a real-data classifier, Frechet distance, diversity."""

from megatron_apex.eval.classifier import SmallCNN, features, load_or_train_classifier, logits
from megatron_apex.eval.metrics import evaluate_images
from megatron_apex.eval.scores import class_accuracy, diversity, frechet_distance, frechet_distance_from_stats

__all__ = ["SmallCNN", "class_accuracy", "diversity", "evaluate_images", "features", "frechet_distance",
           "frechet_distance_from_stats", "load_or_train_classifier", "logits"]
