"""Every `scripts/convert.py` subcommand reads --src and writes --out; mask2former's old positional form
still parses, with a deprecation note. Parsing only (no checkpoint is read)."""

import argparse
import importlib.util

import pytest


@pytest.fixture(scope="module")
def convert_script(repo):
    spec = importlib.util.spec_from_file_location("convert_script", repo / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subcommands(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_subcommand_takes_src_and_out(convert_script, capsys):
    parser = convert_script.build_parser()
    commands = subcommands(parser)
    assert {"mask2former", "mit", "rass", "ram", "refign", "sd", "uawarpc"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0
        usage = capsys.readouterr().out
        assert "--src SRC" in usage and "--out OUT" in usage, f"convert.py {name}: {usage[:600]}"


def test_mask2former_positional_form_is_deprecated_but_works(convert_script, capsys):
    from lqseg_jax.convert.mask2former import _src_and_out

    parser = convert_script.build_parser()
    assert _src_and_out(parser.parse_args(["mask2former", "--src", "a.pth", "--out", "o"])) == ("a.pth", "o")
    assert capsys.readouterr().err == ""
    assert _src_and_out(parser.parse_args(["mask2former", "a.pth", "o"])) == ("a.pth", "o")
    assert "deprecated; use --src CHECKPOINT --out OUT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--src CHECKPOINT and --out OUT are required"):
        _src_and_out(parser.parse_args(["mask2former", "--src", "a.pth"]))
