"""Command groups of the CLI; each module has ``register(subparsers, formatter)``."""

from . import bench, config_cmd, data, kb

ALL = [data, kb, config_cmd, bench]
