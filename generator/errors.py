"""The errors a person can act on. The command line prints them as one line and exits with code 2;
any other exception is a bug in synthmed and is shown with its traceback.

``generator`` is the bottom package (knowledge, rlhf, agents and pipelines import it), so the
base classes live here.
"""

from __future__ import annotations


class SynthmedError(Exception):
    """An expected failure whose message tells a person what went wrong and how to fix it."""


class UserError(SynthmedError, ValueError):
    """Bad input, config, file or argument. A ValueError too, so ``except ValueError`` still catches it."""


class UnknownModalityError(UserError):
    """A modality name that is neither a configured modality nor one of its aliases."""


__all__ = ["SynthmedError", "UnknownModalityError", "UserError"]
