"""`upt reproduce`: the paper's experiment grids, resumable, with its tables' shapes and Figure 4's plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbone import Backbone
from .grid import GRIDS, GridSpec, Run
from .plots import require_matplotlib, write_plots
from .report import cells, paper_results, write_csv, write_report
from .runner import Plan, RunOptions, plan, run_grid

__all__ = ["GRIDS", "GridSpec", "Plan", "Run", "RunOptions", "paper_results", "plan", "reproduce", "write_outputs"]


def reproduce(backbone: Backbone, grid: GridSpec, root: Path, out_dir: Path, options: RunOptions = RunOptions(),
              show_progress: bool = True) -> dict[str, Any]:
    """Run what is not finished of `grid` and write results.csv, report.md and the plots into `out_dir`."""
    require_matplotlib()  # before hours of training, not after
    results = run_grid(backbone, grid.runs(), root, out_dir, options, show_progress)
    return write_outputs(results, out_dir)


def write_outputs(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    plots = write_plots(cells(results), out_dir / "plots")
    return {"runs": len(results), "results_csv": str(write_csv(results, out_dir / "results.csv")),
            "report": str(write_report(results, out_dir / "report.md", plots)),
            "plots": {name: str(path) for name, path in plots.items()}}
