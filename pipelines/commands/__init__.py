"""Command groups of the CLI; each module has ``register(subparsers, formatter)``."""

from . import bench, config_cmd, data, kb, train

ALL = [data, train, kb, config_cmd, bench]
