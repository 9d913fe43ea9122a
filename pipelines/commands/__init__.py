"""Command groups of the CLI; each module has ``register(subparsers, formatter)``."""

from . import bench, config_cmd, data, evaluate, generate, improve, judges, kb, train
from . import runs

ALL = [improve, data, train, kb, judges, evaluate, generate, config_cmd, bench, runs]
from . import synthesize  # noqa: E402  (synthmed synthesize)
ALL.append(synthesize)
