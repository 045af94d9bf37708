"""A bench's results table drawn as a PNG beside it: one panel per group of
rows, one line per implementation, a column against another.

harness.write_results draws it when the bench gives a Plot; this redraws it
from a results JSON without rerunning the bench:

    python -m bench.plot bench/results/h100/quantized_matmul.json

matplotlib is optional: without it, the tables are written all the same.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Plot:
    """What to draw from a bench's rows.

    x: the column on the x axis (e.g. "M"). lines: (column, legend label)
    pairs, one line each. panels: the columns whose values pick a row's
    panel; panel_title is formatted with a row of the panel, e.g.
    "{bits}-bit N={N} K={K}". variant: (column prefix, label): the same lines
    again, dashed, from the columns named prefix + column (e.g. "p_" for
    pipelined timings). Rows without a value (None) leave a gap."""
    x: str
    lines: Sequence[tuple[str, str]]
    panels: Sequence[str]
    panel_title: str
    x_label: str
    y_label: str
    log_x: bool = True
    log_y: bool = True
    variant: tuple[str, str] | None = None
    panels_per_row: int = 4


def panel_rows(rows: Sequence[dict], panels: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by their values of the `panels` columns, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[c] for c in panels), []).append(row)
    return groups


def write_png(results_json: Path, plot: Plot) -> Path | None:
    """Draws the rows of results_json (as harness.write_results writes it)
    into the .png beside it and returns its path; None without matplotlib."""
    png = results_json.with_suffix(".png")
    try:
        import matplotlib
    except ImportError:
        print(f"plot skipped: matplotlib is not installed, {png.name} not written", flush=True)
        return None
    matplotlib.use("Agg")  # files only: bench machines have no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    results = json.loads(results_json.read_text())
    info, groups = results["machine"], panel_rows(results["rows"], plot.panels)
    columns = min(plot.panels_per_row, len(groups))
    rows_of_panels = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, squeeze=False, layout="constrained",
                             # wide enough for the title and the legend over a single panel
                             figsize=(max(4.2 * columns, 9.0), 3.0 * rows_of_panels + 1.0))
    styles = [("", "-")] + ([(plot.variant[0], "--")] if plot.variant else [])
    handles = {}
    for index, (ax, group) in enumerate(zip(axes.flat, groups.values())):
        xs = sorted({r[plot.x] for r in group})
        for i, (column, label) in enumerate(plot.lines):
            for prefix, style in styles:
                points = sorted((r[plot.x], r[prefix + column]) for r in group
                                if r.get(prefix + column) is not None)
                if points:
                    line, = ax.plot(*zip(*points), style, color=f"C{i}", marker="o", markersize=3)
                    handles.setdefault(label, line)
        ax.set_title(plot.panel_title.format(**group[0]), fontsize=9)
        if index + columns >= len(groups):  # no panel below this one
            ax.set_xlabel(plot.x_label, fontsize=9)
        ax.set_xscale("log" if plot.log_x else "linear")
        ax.set_yscale("log" if plot.log_y else "linear")
        ax.set_xticks(xs, [str(x) for x in xs])  # the measured x values, not powers of ten
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(labelsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    if plot.variant:
        handles[f"dashed: {plot.variant[1]}"] = Line2D([], [], color="gray", linestyle="--")
    device = info.get("gpu") or f"{info.get('cpu')}, {info.get('cores')} cores"
    fig.suptitle(f"{results_json.stem} on {info['machine']} ({device}), {info.get('date', '')}",
                 fontsize=11)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center",
               ncol=len(handles), fontsize=9, frameon=False)
    fig.supylabel(plot.y_label, fontsize=10)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def bench_module(results_json: Path):
    """The bench_<name>.py that wrote a results file: the longest <name> its
    file name starts with (quantized_matmul_quick.json: bench_quantized_matmul)."""
    parts = results_json.stem.split("_")
    for count in range(len(parts), 0, -1):
        module = "bench_" + "_".join(parts[:count])
        if (Path(__file__).parent / f"{module}.py").exists():
            return importlib.import_module(f"{__package__}.{module}")
    raise SystemExit(f"no bench/bench_*.py names {results_json.name}")


def main():
    parser = argparse.ArgumentParser(description="Redraws the PNG of bench results JSON files.")
    parser.add_argument("results", nargs="+", type=Path, help="bench/results/<machine>/<name>.json")
    for results_json in parser.parse_args().results:
        module = bench_module(results_json)
        if not hasattr(module, "plot_for"):
            raise SystemExit(f"{module.__name__} draws no plot (it has no plot_for)")
        info = json.loads(results_json.read_text())["machine"]
        png = write_png(results_json, module.plot_for(info))
        if png:
            print(f"written {png}")


if __name__ == "__main__":
    main()
