"""Errors: a user error is one line and exit code 2; anything else is a bug, shown with its traceback."""

import pytest

from generator.errors import SynthmedError, UnknownModalityError, UserError
from pipelines.cli import main
from pipelines.commands import config_cmd


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    assert main(["config", "show", "--config", "nosuch"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("synthmed config: error: ") and "not found" in lines[0]
    assert "Traceback" not in err


def test_a_user_error_raised_by_a_command_is_exit_code_2(monkeypatch, capsys):
    def bad_input(args, extra):
        raise UserError("--thing must be positive, got -1")

    monkeypatch.setattr(config_cmd, "_show", bad_input)
    assert main(["config", "show"]) == 2
    assert capsys.readouterr().err.strip() == "synthmed config: error: --thing must be positive, got -1"


def test_a_full_disk_is_one_line_and_exit_code_2_not_a_bug_report(monkeypatch, capsys):
    import errno

    def full(args, extra):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setattr(config_cmd, "_show", full)
    assert main(["config", "show"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("exc", [ValueError("shapes (2, 3) and (3, 2) differ"), KeyError("latents"), RuntimeError("boom")])
def test_an_internal_error_shows_its_traceback_and_how_to_report_it(monkeypatch, capsys, exc):
    def broken(args, extra):
        raise exc

    monkeypatch.setattr(config_cmd, "_show", broken)
    assert main(["config", "show", "--json"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(exc).__name__ in err
    assert "synthmed config: error:" not in err, "an internal error is never disguised as bad input"
    last = err.strip().splitlines()[-1]
    assert "internal error" in last and "bug in synthmed" in last and "report" in last
    assert "synthmed config show --json" in last and "version" in last and "traceback" in last


def test_keyboard_interrupt_is_exit_code_130(monkeypatch, capsys):
    def interrupted(args, extra):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_cmd, "_show", interrupted)
    assert main(["config", "show"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_unknown_modality_error_is_one_class_importable_from_its_old_places():
    from generator.modalities import UnknownModalityError as from_generator
    from knowledge.retriever import UnknownModalityError as from_knowledge

    assert from_generator is from_knowledge is UnknownModalityError
    assert issubclass(UnknownModalityError, UserError)


def test_user_errors_are_value_errors_and_share_one_base():
    assert issubclass(UserError, SynthmedError) and issubclass(UserError, ValueError)


def test_user_facing_error_classes_derive_from_the_base():
    from agents.schema import StageError
    from agents.traces import TraceNotFoundError
    from generator.data.errors import DataError
    from generator.data.imageio import ImageReadError
    from knowledge.index import KnowledgeIndexError
    from knowledge.lexicon import LexiconError
    from knowledge.radlex import RadLexError
    from knowledge.snomed import SnomedError
    from pipelines.config import ConfigError
    from pipelines.improve import ResumeError
    from rlhf.alignment import AlignmentNotFoundError
    from rlhf.classifiers import ClassifierNotFoundError
    from rlhf.selector import SelectorNotFoundError
    from rlhf.trainer import NonFiniteError

    for cls in (ConfigError, DataError, StageError, TraceNotFoundError, KnowledgeIndexError, LexiconError, RadLexError,
                SnomedError, ResumeError):
        assert issubclass(cls, UserError), cls
    assert issubclass(TraceNotFoundError, LookupError)
    for cls in (ImageReadError, AlignmentNotFoundError, ClassifierNotFoundError, SelectorNotFoundError):
        assert issubclass(cls, SynthmedError) and issubclass(cls, OSError), cls  # still caught as file errors
    assert issubclass(NonFiniteError, SynthmedError) and issubclass(NonFiniteError, ValueError)
