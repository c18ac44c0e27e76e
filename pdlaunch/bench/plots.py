"""`pdlaunch bench serve --plot`'s PNGs (latency histograms, latency over the run), and matplotlib, which is
optional, for every bench plot."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from pdlaunch.bench.report import MS_PER_S, TITLES, RequestResult
from pdlaunch.errors import PdlaunchError


def require_matplotlib() -> ModuleType:
    """matplotlib.pyplot on the Agg backend; matplotlib is optional, so say how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PdlaunchError(
            "--plot needs matplotlib, which is not installed",
            field="--plot",
            hint="pip install matplotlib  (or pip install 'pdlaunch[bench]')",
        ) from None
    return plt


def write_plots(results: list[RequestResult], out_dir: Path) -> list[Path]:
    """PNG histograms of TTFT/TPOT/ITL/E2EL and latency over the run. Needs matplotlib (optional)."""
    plt = require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if not r.error]

    def ms(seconds: Iterable[float]) -> list[float]:
        return [x * MS_PER_S for x in seconds]

    series = {
        "ttft": ms(r.ttft for r in ok),
        "tpot": ms((r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1),
        "itl": ms(gap for r in ok for gap in r.itl),
        "e2el": ms(r.latency for r in ok),
    }
    written: list[Path] = []
    for name, values in series.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(values, bins=min(50, max(1, len(values))))
        ax.set_title(f"{TITLES[name]} ({len(values)} samples)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    starts = [r.start for r in ok]
    ax.scatter(starts, series["ttft"], s=6, label="TTFT")
    ax.scatter(starts, series["e2el"], s=6, label="E2EL")
    ax.set_xlabel("request sent at (s since start)")
    ax.set_ylabel("ms")
    ax.set_title("Latency over the run")
    ax.legend()
    path = out_dir / "latency_over_time.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
