"""The ``mamba-cp`` command: demo and verify run real gloo processes and report exactness."""

from mamba_cp import cli


def test_demo_passes_and_prints_every_gradient(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in ("output", "input.grad", "in_proj.weight.grad", "conv1d.bias.grad", "A_log.grad", "out_proj"):
        assert name in out
    assert "all exact to rounding level" in out


def test_verify_thd_cp4(capsys):
    assert cli.main(["verify", "--cp", "4", "--layout", "thd", "--seqlens", "8,24,16", "--heads", "8"]) == 0
    assert "PASS" in capsys.readouterr().out


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
