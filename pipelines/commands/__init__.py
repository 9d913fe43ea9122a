"""Command groups of the CLI; each module has ``register(subparsers, formatter)``."""

from . import bench, config_cmd, dashboard, data, evaluate, generate, improve, judges, kb, runs, synthesize, train

ALL = [improve, data, train, kb, judges, evaluate, generate, synthesize, config_cmd, bench, runs, dashboard]
