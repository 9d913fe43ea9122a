"""Roles, splits and the saved layout of the finding classifiers."""

from __future__ import annotations

from pathlib import Path

VERSION = "2"  # bump when the saved layout or the architectures change (2: config.json records the resnet's pooling)
# reward: the loop's reward and reward guidance; verifier: judges what the graph keeps, apart from what guided or trained it;
# evaluator: held out, never in a reward or a decision
ROLES = ("reward", "verifier", "evaluator")
SPLITS = ("train", "calibration", "test")
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "weights" / "classifiers"  # the shipped classifiers
TRAIN_COMMAND = "synthmed judges train classifier{data} --roles {role} --modalities {modality} --out {out}"  # the project's CLI
NEUTRAL_AGREEMENT = 0.5  # score of an image whose prompt states no finding the classifier knows: a coin flip's agreement
ECE_BINS = 10
