"""The shared bench infrastructure (bench/harness.py, bench/plot.py): what the
operator benches rely on to report, without timing anything."""

import sys
from pathlib import Path

import pytest

from bench import harness, plot
from bench.harness import Target

ROWS = [
    {"N": 64, "K": 32, "M": m, "bits": bits, "ours_us": 10.0 * m, "theirs_us": None if m > 8 else 20.0 * m,
     "p_ours_us": 8.0 * m}
    for bits in (4, 8) for m in (1, 8, 32)
]
PLOT = plot.Plot(x="M", lines=[("ours_us", "ours"), ("theirs_us", "theirs")], panels=["bits", "N", "K"],
                 panel_title="{bits}-bit N={N} K={K}", x_label="M", y_label="us per call",
                 variant=("p_", "pipelined"))


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    return tmp_path


def test_render_targets_marks_each_target():
    text = harness.render_targets("Speed targets (an issue)", [
        Target("GEMV >= 80% of copy bandwidth", "85% (13.0 us)", True),
        Target("GEMV >= 3x mx.quantized_matmul", "2.57x", False),
    ])
    assert text == ("## Speed targets (an issue)\n\n"
                    "- MET: GEMV >= 80% of copy bandwidth: 85% (13.0 us)\n"
                    "- NOT MET: GEMV >= 3x mx.quantized_matmul: 2.57x")


def test_markdown_table_formats_floats_and_leaves_missing_cells_empty():
    rows = [{"M": 1, "ms": 0.123456, "big": 123456.7}, {"M": 8, "ms": 12.0}]
    assert harness.markdown_table(rows, [("M", "M"), ("ms", "time ms"), ("big", "B/s")]) == (
        "| M | time ms | B/s |\n"
        "|---|---|---|\n"
        "| 1 | 0.123 | 123,457 |\n"
        "| 8 | 12 |  |")


def test_find_row_matches_every_given_column():
    assert harness.find_row(ROWS, M=8, bits=8)["p_ours_us"] == 64.0
    assert harness.find_row(ROWS, M=2) is None


def test_machine_name_is_an_argument(monkeypatch):
    monkeypatch.delenv("MLX_EXT_BENCH_MACHINE", raising=False)
    assert harness.machine_info()["machine"] == harness.machine_name()
    assert harness.machine_info(machine="h100")["machine"] == "h100"
    monkeypatch.setenv("MLX_EXT_BENCH_MACHINE", "my-box")
    assert harness.machine_info(machine="h100")["machine"] == "my-box"


def test_write_results_draws_a_png_beside_the_tables(results_dir):
    pytest.importorskip("matplotlib")
    folder = harness.write_results("op", {"machine": "box"}, ROWS, "| table |", PLOT)
    png = folder / "op.png"
    assert folder == results_dir / "box"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot.write_png(folder / "op.json", PLOT) == png


def test_without_matplotlib_the_tables_are_written_and_the_plot_skipped(results_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    folder = harness.write_results("op", {"machine": "box"}, ROWS, "| table |", PLOT)
    assert "| table |" in (folder / "op.md").read_text()
    assert (folder / "op.json").stat().st_size > 0
    assert not (folder / "op.png").exists()
    assert capsys.readouterr().out.count("plot skipped") == 1


def test_a_results_file_finds_the_bench_that_wrote_it():
    module = plot.bench_module(Path("bench/results/h100/quantized_matmul_quick.json"))
    assert module.__name__ == "bench.bench_quantized_matmul"
    assert module.plot_for({"gpu": "NVIDIA H100"}) is module.GPU_PLOT


def test_read_each_once_calls_every_copy_unless_slow():
    import time

    from bench import harness

    seen = []
    harness.read_each_once(seen.append, 5)
    assert seen == [0, 1, 2, 3, 4]
    slow = []
    harness.read_each_once(lambda i: (slow.append(i), time.sleep(0.02)), 5, max_call_s=0.01)
    assert slow == [0]  # one call over the limit: the rest are skipped
