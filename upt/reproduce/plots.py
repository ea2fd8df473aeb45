"""Accuracy against shots, one PNG per data set, as the paper's Figure 4 (matplotlib: `upt[reproduce]`)."""

from __future__ import annotations

from pathlib import Path

from ..datasets import DATASETS
from ..errors import ConfigError
from ..methods.config import ZERO_SHOT
from .report import METHOD_TITLES, Cell, paper_results


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("upt reproduce draws its plots with matplotlib: pip install 'upt[reproduce]'.") from None


def write_plots(table: dict[tuple[str, str, int, str], Cell], out_dir: Path) -> dict[str, Path]:
    """{data set: PNG} for every data set with results on its own test split."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paper = paper_results()["table2"]
    paths = {}
    for name in sorted({key[0] for key in table if key[0] == key[3]}):
        own = {key: cell for key, cell in table.items() if key[0] == name and key[3] == name}
        figure, axes = plt.subplots(figsize=(5, 4))
        for method in sorted({key[1] for key in own}, key=lambda m: list(METHOD_TITLES).index(m)
                             if m in METHOD_TITLES else len(METHOD_TITLES)):
            label = METHOD_TITLES.get(method, method)
            if method == ZERO_SHOT:
                axes.axhline(own[(name, method, 0, name)].mean, linestyle="--", color="grey", label=label)
                continue
            points = sorted((key[2], cell) for key, cell in own.items() if key[1] == method)
            line = axes.errorbar([k for k, _ in points], [c.mean for _, c in points], yerr=[c.std for _, c in points],
                                 marker="o", capsize=3, label=label)
            if name in paper.get(method, {}):
                axes.plot([16], [paper[method][name]], marker="*", markersize=11, linestyle="none",
                          color=line[0].get_color())
        axes.set_xscale("log", base=2)
        axes.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        axes.set_xlabel("shots per class")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(f"{DATASETS[name].title if name in DATASETS else name} (★: the paper, 16 shots)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        paths[name] = out_dir / f"{name}.png"
        figure.savefig(paths[name], dpi=100)
        plt.close(figure)
    return paths
