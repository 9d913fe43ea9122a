"""Multi-label finding classifiers with calibrated probabilities, and the finding scorer.

Modules: ``layout`` (roles, splits, the saved layout), ``networks`` (architectures), ``model`` (a trained
classifier: inference, load, save), ``data`` (label space, split, encoding), ``calibration`` (metrics and the
temperature), ``training`` (fit and train every role and modality), ``scorer`` (the finding scorer).
Everything public is importable from ``rlhf.classifiers``.

Per modality there are three independent classifiers (``ROLES``):

- ``reward``: serves the finding-agreement reward and reward guidance (``rlhf.guidance``);
- ``verifier``: serves the verifier agent (``agents.verifier.role``), so that what the graph keeps is judged by
  another network than the one that guided its draw or trained its adapter;
- ``evaluator``: held out, never enters a reward or a decision; the evaluation reads its probabilities and its
  penultimate-layer features (the project's own image-feature space for a Fréchet distance).

They differ in seed, data split (a hash of each image's path salted with role and seed) and
architecture or width (``convnet``: plain conv-BatchNorm-ReLU-pool stages with average and max pooling;
``resnet``: residual blocks of another width and depth, average pooling or, with ``resnet_pool``
``avgmax``, average and max), so a generator that learns to fool one has not thereby fooled the other.
The verifier is a convnet of other widths than the reward's, so the evaluator's architecture stays its own.

Layout of a trained classifier, ``<out>/<role>/<modality>/``::

    model.safetensors   the network's state dict
    config.json         architecture, label names, image size, temperature, role (checked at load)
    metadata.json       version, seed, data, split sizes, epochs, metrics, seconds, device, command

    summaries = train_all(ClassifierConfig(), load_rows(["data/phantoms_64px_seed4242_300pf"]), out="rlhf/weights/classifiers")
    scorer = build_scorer("finding_reward")     # the shipped reward classifiers, every modality
    scores, details = scorer.score(images, prompts, modalities, expected=[{"pleural_effusion": True}, ...])

Training: AdamW with linear warm-up then cosine decay, BCE with logits (masked where a dataset
does not annotate a label), light augmentation without flips. Of the rows, ``val_fraction`` is
held back: half to fit the temperature and each label's operating point (the probability from which a
finding counts as shown: :func:`fit_operating_points`), half to report AUROC, calibration error and the
sensitivity and specificity at those points, so no number is measured on data that chose it. The shipped classifiers come from
``synthmed judges train classifier``: by default on their own phantom set
(``judges.classifier.phantoms_per_finding`` at ``phantoms_seed``), whose images are neither the
evaluation's reference phantoms, nor the benchmark's, nor the generator's training set.
"""

from __future__ import annotations

from ..metrics import auroc
from .calibration import classification_metrics, expected_calibration_error, fit_operating_points, fit_temperature, masked_nll, operating_point_metrics
from .data import (
                   LabelledImages,
                   annotated_labels,
                   augment_batch,
                   encode_rows,
                   is_phantom_row,
                   label_space,
                   split_key,
                   split_of_row,
                   split_rows,
)
from .layout import DEFAULT_ROOT, ECE_BINS, NEUTRAL_AGREEMENT, ROLES, SPLITS, TRAIN_COMMAND, VERSION
from .model import ClassifierNotFoundError, FindingClassifier, load_classifier, save_classifier, train_command
from .networks import ARCHITECTURES, DEFAULT_POOL, POOLS, ConvNet, ResidualBlock, ResNet, build_network, role_settings
from .scorer import FindingScorer, finding_evaluator_scorer, finding_reward_scorer, finding_verifier_scorer, load_finding_scorer
from .training import fit_classifier, format_summary, load_rows, pair_metrics, pair_of, phantom_benchmark_rows, train_all, train_classifier

__all__ = [
    "ARCHITECTURES", "ClassifierNotFoundError", "ConvNet", "DEFAULT_POOL", "DEFAULT_ROOT", "ECE_BINS", "FindingClassifier", "FindingScorer",
    "LabelledImages", "NEUTRAL_AGREEMENT", "POOLS", "ROLES", "ResNet", "ResidualBlock", "SPLITS", "TRAIN_COMMAND", "VERSION",
    "annotated_labels", "augment_batch", "auroc", "build_network", "classification_metrics", "encode_rows", "expected_calibration_error",
    "finding_evaluator_scorer", "finding_reward_scorer", "finding_verifier_scorer", "fit_classifier", "fit_operating_points", "fit_temperature", "format_summary", "is_phantom_row",
    "label_space", "load_classifier", "load_finding_scorer", "load_rows", "masked_nll", "operating_point_metrics", "pair_metrics", "pair_of", "phantom_benchmark_rows", "role_settings",
    "save_classifier", "split_key", "split_of_row", "split_rows", "train_all", "train_classifier", "train_command",
]
