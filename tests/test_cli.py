"""The ``mamba-cp`` command: demo and verify run real gloo processes and report exactness."""

import pytest

from mamba_cp import cli


def test_demo_passes_and_prints_every_gradient(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in ("output", "input.grad", "in_proj.weight.grad", "conv1d.bias.grad", "A_log.grad", "out_proj"):
        assert name in out
    assert "all exact to rounding level" in out
    assert "cut as one stream" in out and out.count("PASS (tolerance") == 3


def test_verify_thd_cp4(capsys):
    assert cli.main(["verify", "--cp", "4", "--layout", "thd", "--seqlens", "8,24,16", "--heads", "8"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_verify_a_stream_pack(capsys):
    argv = ["verify", "--cp", "2", "--layout", "thd", "--packed-layout", "stream", "--seqlens", "3,17,1,11"]
    assert cli.main([*argv, "--strategy", "state_passing"]) == 0
    assert "stream" in capsys.readouterr().out


def test_verify_reports_bad_configuration(capsys):
    assert cli.main(["verify", "--cp", "2", "--heads", "3", "--groups", "1"]) == 2
    assert "num_heads (3) must be divisible by cp_size (2)" in capsys.readouterr().err


def test_usage():
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


def test_plan_prints_bytes(capsys):
    assert cli.main(["plan", "--cp", "2"]) == 0
    out = capsys.readouterr().out
    assert "hidden (ours)" in out and "NeMo AutoModel 0.7" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify", "--cp", "0"], "argument --cp: must be an integer >= 1, got 0"),
        (["verify", "--cp", "-2"], "argument --cp: must be an integer >= 1, got -2"),
        (["verify", "--seqlen", "0"], "argument --seqlen: must be an integer >= 1, got 0"),
        (["verify", "--layout", "thd", "--seqlens", "8,0,16"], "argument --seqlens: each value of '8,0,16' must be"),
        (["verify", "--seqlens", "8,,16"], "argument --seqlens: must be a comma-separated list of integers >= 1"),
        (["verify", "--heads", "0"], "argument --heads: must be an integer >= 1, got 0"),
        (["verify", "--batch", "-1"], "argument --batch: must be an integer >= 1, got -1"),
        (["verify", "--chunk", "0"], "argument --chunk: must be an integer >= 1, got 0"),
        (["verify", "--cp", "two"], "argument --cp: must be an integer >= 1, got 'two'"),
        (["plan", "--cp", "0"], "argument --cp: each value of '0' must be an integer >= 1, got 0"),
        (["plan", "--cp", "2,0,8"], "argument --cp: each value of '2,0,8' must be an integer >= 1, got 0"),
        (["plan", "--cp", "2,-4"], "argument --cp: each value of '2,-4' must be an integer >= 1, got -4"),
        (["plan", "--heads", "0"], "argument --heads: must be an integer >= 1, got 0"),
        (["plan", "--tokens", "-5"], "argument --tokens: must be an integer >= 1, got -5"),
        (["plan", "--dtype-bytes", "0"], "argument --dtype-bytes: must be an integer >= 1, got 0"),
    ],
)
def test_sizes_below_one_are_refused_with_the_rule(argv, message, capsys):
    """No rank is started and nothing divides by zero: the option, the rule and the value are named."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert f"mamba-cp {argv[0]}: error:" in captured.err
    assert "PASS" not in captured.out


def test_plan_takes_a_list_of_cp_sizes(capsys):
    assert cli.main(["plan", "--cp", "1,3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("hidden (ours)")]
    assert [row[2] for row in rows] == ["1", "3"]


def test_subcommand_help_returns_zero(capsys):
    assert cli.main(["plan", "--help"]) == 0
    assert "each >= 1" in capsys.readouterr().out
