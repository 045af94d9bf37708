"""`python -m mlx_ext.generate --sparsity`: argument checks and one pruned
generation of the embedded model."""

import pytest

from mlx_ext import generate, gpt
from mlx_ext.sparsify import calibration_split, parse_sparsity


@pytest.mark.parametrize("text,want", [
    ("2:4", {"pattern": "2:4"}), ("4:8", {"pattern": "4:8"}), ("0.5", {"density": 0.5}),
    ("0.9", {"density": pytest.approx(0.1)}),
])
def test_parse_sparsity(text, want):
    assert parse_sparsity(text) == want


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "a:4", "2:", "0", "1", "1.5", "-0.5", "half", ""])
def test_bad_sparsity_is_an_argparse_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        generate.parse_args(["--sparsity", bad])
    assert e.value.code == 2
    assert "--sparsity" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--sparse-format", "coo"], ["--sparse-bits", "3"],
                                  ["--sparse-method", "random"]])
def test_bad_companions_are_argparse_errors(argv):
    with pytest.raises(SystemExit) as e:
        generate.parse_args(["--sparsity", "2:4", *argv])
    assert e.value.code == 2


def test_format_must_fit_the_sparsity():
    args = generate.parse_args(["--sparsity", "0.5", "--sparse-format", "nm"])
    with pytest.raises(SystemExit, match=r"\[mlx_ext.generate\] --sparse-format nm"):
        generate.prune(None, None, args)


def test_calibration_is_not_the_scored_text():
    _, tokenizer = gpt.load()
    calibration, rest = calibration_split(tokenizer)
    text = gpt.HELD_OUT_TEXT.read_text()
    assert calibration.shape == (1, 256)
    assert tokenizer.decode(calibration[0].tolist()) + rest == text


@pytest.mark.parametrize("argv", [["--sparsity", "2:4"], ["--sparsity", "0.5", "--sparse-format", "csr"]])
def test_generate_pruned(argv, capsys):
    assert generate.main([*argv, "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert f"[pruned to {argv[1]} (wanda): replaced: 42 QuantizedLinear" in out
