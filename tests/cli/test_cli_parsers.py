"""flowmatch.cli: one module a sub-command, composed by build_parser; help for every option."""

import argparse

import pytest

from flowmatch import cli
from flowmatch.cli import build_parser, distill, export, info, latents, sample, train, vae
from flowmatch.cli import eval as evaluate

COMMANDS = {"train": train, "sample": sample, "reflow": distill, "distill": distill,
            "encode-latents": latents, "train-vae": vae, "finetune-vae": vae, "recon": vae, "eval": evaluate,
            "export": export, "info": info}


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _every_parser(p, name="flowmatch"):
    yield name, p
    for sub, sp in _subparsers(p).items():
        yield from _every_parser(sp, f"{name} {sub}")


def test_sub_commands_in_order_each_handled_by_its_module():
    subs = _subparsers(build_parser())
    assert list(subs) == ["train", "sample", "reflow", "distill", "encode-latents", "train-vae", "finetune-vae",
                          "recon", "eval", "export", "info"]
    for name, module in COMMANDS.items():
        assert subs[name].get_default("handler") is module.run, name
    assert list(_subparsers(subs["eval"])) == ["fid", "accuracy", "nll"]


def test_entry_point_names_stay_importable():
    assert callable(cli.main) and callable(cli.build_parser)
    assert (cli.EXIT_OK, cli.EXIT_DIVERGED, cli.EXIT_BAD_INPUT, cli.EXIT_INTERRUPTED) == (0, 1, 2, 130)


def test_every_option_has_help_text():
    for name, p in _every_parser(build_parser()):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest}: no help text"


@pytest.mark.parametrize("argv, expected", [
    (["sample", "RUN"], {"steps": None, "method": None, "grid": None, "cfg_scale": 1.0,
                         "cfg_interval": [0.0, 1.0], "n": 64}),
    (["distill", "RUN", "--out", "S", "--nfe", "2"], {"nfe": 2, "grid": "uniform", "grid_shift": 1.0,
                                                     "cfg_scale": 1.0, "teacher_method": "rk4"}),
    (["reflow", "RUN", "--out", "S"], {"cfg_scale": 1.0, "pairs": 10000}),
    (["eval", "nll", "RUN"], {"method": None, "steps": None, "n": 512, "atol": 1e-5}),
])
def test_shared_sampling_options_parse_with_each_commands_defaults(argv, expected):
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


def test_distill_needs_the_students_nfe(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["distill", "RUN", "--out", "S"])
    assert e.value.code == 2 and "--nfe" in capsys.readouterr().err


def test_sample_help_says_where_its_defaults_come_from():
    text = " ".join(_subparsers(build_parser())["sample"].format_help().split())
    for part in ("solver steps (default: the run's sample.steps)",
                 "meanflow (1) (default: the run's sample.method)",
                 "time grid: uniform | shifted | edm (default: the run's)",
                 "scale of w(t) (default: the run's sample.diffusion_norm)",
                 "samples per forward batch (default: 256)"):
        assert part in text, part


def test_method_help_lists_every_registered_method():
    from flowmatch.flow.solver_registry import SOLVERS

    text = " ".join(_subparsers(build_parser())["sample"].format_help().split())
    assert all(name in text for name in SOLVERS)
