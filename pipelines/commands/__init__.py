"""Command groups of the CLI; each module has ``register(subparsers, formatter)``."""

from . import bench, config_cmd, data

ALL = [data, config_cmd, bench]
