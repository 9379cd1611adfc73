"""flowmatch.cli.common: the help formatter, the shared sampling options, training exit codes."""

import argparse

import pytest

from flowmatch.cli.common import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    SAMPLING_OPTIONS,
    HelpFormatter,
    add_sampling_option,
    training_exit_code,
)


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="t", formatter_class=HelpFormatter)


def test_formatter_shows_a_default_once_and_only_where_there_is_one():
    p = _parser()
    p.add_argument("--batch-size", type=int, default=256, help="items per batch")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the run's)")
    p.add_argument("--n", type=int, default=8, help="count (default: eight)")
    p.add_argument("--flag", action="store_true", help="a switch")
    text = " ".join(p.format_help().split())
    assert "items per batch (default: 256)" in text
    assert "steps (default: the run's)" in text and "(default: None)" not in text
    assert text.count("default: eight") == 1 and "(default: 8)" not in text
    assert "a switch (default" not in text


def test_sampling_option_keeps_the_shared_type_and_takes_a_commands_changes():
    p = _parser()
    steps = add_sampling_option(p, "--steps", default_from="the run's sample.steps")
    grid = add_sampling_option(p, "--grid", default="uniform", help="the student's grid")
    interval = add_sampling_option(p, "--cfg-interval")
    assert steps.type is int and steps.help == "solver steps (default: the run's sample.steps)"
    assert grid.default == "uniform" and grid.help == "the student's grid"
    args = p.parse_args(["--steps", "7", "--cfg-interval", "0.2", "1"])
    assert args.steps == 7 and args.grid == "uniform" and args.cfg_interval == [0.2, 1.0]
    assert interval.metavar == ("T_LO", "T_HI")
    # the table itself is not changed by a command's replacements
    assert SAMPLING_OPTIONS["--grid"]["default"] is None
    with pytest.raises(KeyError):
        add_sampling_option(p, "--atol")


@pytest.mark.parametrize("status, code", [("done", EXIT_OK), ("interrupted", EXIT_INTERRUPTED)])
def test_training_exit_code_of_a_finished_job(status, code):
    assert training_exit_code(lambda: status) == code


def test_training_exit_code_of_a_diverged_job_is_one_line_and_1(capsys):
    from flowmatch.training import NonFiniteLossError

    def fit():
        raise NonFiniteLossError("loss is nan at step 3")

    assert training_exit_code(fit) == EXIT_DIVERGED
    assert capsys.readouterr().err.strip() == "error: loss is nan at step 3"
