"""Command groups of the CLI; each module has ``register(subparsers, formatter)``."""

from . import bench, config_cmd, data, evaluate, generate, judges, kb, train

ALL = [data, train, kb, judges, evaluate, generate, config_cmd, bench]
