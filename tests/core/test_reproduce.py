"""`upt reproduce`: a small grid end to end on the tiny backbone, resumed, and its report and plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from coop_layout import coop_root, imagenet_root

from upt.reproduce import GridSpec, RunOptions, paper_results, reproduce

PNG = b"\x89PNG\r\n\x1a\n"


def upt_reproduce(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "upt", "reproduce", *args, "--json"], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_2x2x1x2_grid_resumes_and_writes_its_report_and_plots(tiny_checkpoint, tmp_path):
    root = coop_root(tmp_path / "data", "eurosat", "2750", "split_zhou_EuroSAT.json")
    coop_root(root, "dtd", "images", "split_zhou_DescribableTextures.json")
    out = tmp_path / "results"
    grid = ["--grid", "few-shot", "--root", str(root), "--out", str(out), "--datasets", "eurosat,dtd",
            "--methods", "coop,vpt-shallow", "--shots", "2", "--seeds", "1,2"]
    backbone = ["--model", "upt-tiny", "--pretrained", str(tiny_checkpoint)]
    planned = upt_reproduce(*grid, "--dry-run")
    assert (len(planned["todo"]), planned["done"], planned["missing"]) == (8, [], {})

    first = upt_reproduce(*grid, *backbone, "--epochs", "1", "--quiet")
    assert first["runs"] == 8
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and {(r["dataset"], r["method"], r["seed"]) for r in rows} == {
        (d, m, s) for d in ("eurosat", "dtd") for m in ("coop", "vpt-shallow") for s in ("1", "2")}
    assert all(0 <= float(r["accuracy"]) <= 1 and r["shots"] == "2" and r["train_count"] == "8" for r in rows)
    report = (out / "report.md").read_text()
    assert "## Table 2: few-shot accuracy, 2 shots" in report and "| DescribableTextures | EuroSAT |" in report
    assert "not the paper's ViT-B/16" in report and " ± " in report
    assert "![eurosat: accuracy by shots](plots/eurosat.png)" in report
    for name in ("eurosat", "dtd"):
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(PNG)

    results = sorted(out.glob("runs/*/*/*/*/result.json"))
    unfinished = out / "runs/dtd/coop/2shot/seed2/result.json"
    unfinished.unlink()  # as if the grid had stopped during this run
    finished = {path: path.stat().st_mtime_ns for path in results if path != unfinished}
    assert upt_reproduce(*grid, "--dry-run")["todo"] == ["dtd/coop/2shot/seed2"]
    upt_reproduce(*grid, *backbone, "--epochs", "1", "--quiet")
    assert unfinished.is_file()
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # the finished runs were skipped


def test_dg_grid_fills_table_1_with_the_papers_numbers_beside(tiny, tmp_path):
    root = imagenet_root(tmp_path / "data")
    grid = GridSpec("dg", methods=("vpt-shallow",), seeds=(1,))
    written = reproduce(tiny, grid, root, tmp_path / "out", RunOptions(epochs=1), show_progress=False)
    result = json.loads(next((tmp_path / "out").glob("runs/imagenet/vpt-shallow/16shot/seed1/result.json")).read_text())
    assert set(result["accuracy"]) == {"imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    report = Path(written["report"]).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 3 | VPT-shallow |"))
    assert "(68.98)" in row and "(58.27)" in row and "—" not in row.split("|")[3]
    assert paper_results()["table1"]["upt"]["imagenet_a"] == 50.66
    assert paper_results()["table2"]["upt"]["average"] == 81.44


def test_imagenet_runs_take_50_epochs_except_methods_with_their_own_schedule():
    from upt.reproduce.grid import default_epochs

    epochs = {run.method: default_epochs(run) for run in GridSpec("dg", seeds=(1,)).runs()}
    assert epochs == {"coop": 50, "cocoop": None, "vpt-shallow": 50, "vpt-deep": 50, "upt": 50}
    assert {default_epochs(r) for r in GridSpec("few-shot", datasets=("eurosat",), seeds=(1,)).runs()} == {None}
