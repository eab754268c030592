"""The ``python -m elbo_jax demo`` command, run in-process at a small size."""

import math
import re

import pytest

from elbo_jax.__main__ import main

pytest.importorskip("matplotlib")


def _log_likelihoods(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"final log-likelihood per datum (\S+)", text)]


def test_demo_fits_both_ways_and_writes_plot(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--num-data", "1500", "--seed", "3"]) == 0
    out = capsys.readouterr().out

    assert "exact EM:" in out
    assert "gradient M-step" in out
    assert len(re.findall(r"iterations \d+, status [A-Z_]+", out)) == 2
    assert len(re.findall(r"first call \(compile \+ run\) [\d.]+ s", out)) == 2
    exact, gradient = _log_likelihoods(out)
    assert math.isfinite(exact) and math.isfinite(gradient)
    # Same k-means++ start for both: exact EM must do at least as well, up to tol-scale slack.
    assert exact >= gradient - 1e-3

    png = tmp_path / "elbo_jax_demo.png"
    assert f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_demo_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--num-data", "--seed"):
        assert option in out


def test_unknown_command_fails_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code != 0
    assert "usage:" in capsys.readouterr().err


def test_missing_command_fails_with_usage(capsys):
    assert main([]) != 0
    assert "usage:" in capsys.readouterr().err


def test_bad_num_data_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--num-data", "0"])
    assert info.value.code != 0
    assert "--num-data" in capsys.readouterr().err
