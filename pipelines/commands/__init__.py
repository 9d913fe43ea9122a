"""Command groups of the CLI; each module has ``register(subparsers, formatter)``."""

from . import bench, config_cmd, data, evaluate, judges, kb, train

ALL = [data, train, kb, judges, evaluate, config_cmd, bench]
