"""Render the Grafana dashboard's panels to a PNG from a Prometheus, with matplotlib.

Same layout (``gridPos``), same PromQL, same legends as deploy/grafana/dashboards/
meda-vllm.json; time series panels are range queries, stat and bar-gauge panels are
instant queries at the end of the window. For README figures without a Grafana.

    python deploy/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --minutes 10 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path

from meda_vllm.testing.prometheus import (
    PrometheusClient,
    dashboard_queries,
    iter_panels,
    legend,
)

DASHBOARD = Path(__file__).parent / "grafana" / "dashboards" / "meda-vllm.json"
ROW_INCHES = 0.42  # one gridPos height unit
COL_INCHES = 0.85  # one of 24 gridPos columns


def fmt(value: float, unit: str | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit in ("bytes", "Bps"):
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.1f} {suffix}" + ("/s" if unit == "Bps" else "")
            value /= 1024
    if unit == "s":
        return f"{1e3 * value:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def scale(unit: str | None) -> tuple[float, str]:
    """Multiplier and axis label for a Grafana unit."""
    return {
        "percentunit": (100.0, "%"),
        "s": (1e3, "ms"),
        "bytes": (1 / 2**20, "MiB"),
        "Bps": (1 / 2**20, "MiB/s"),
        "reqps": (1.0, "req/s"),
    }.get(unit or "", (1.0, ""))


def render(
    prom: PrometheusClient,
    out: Path,
    start: float,
    end: float,
    step: float,
    rate_interval: str,
    dashboard_path: Path = DASHBOARD,
    title: str | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = json.loads(Path(dashboard_path).read_text())
    panels = [p for p in iter_panels(dashboard) if p.get("targets")]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows * ROW_INCHES + 0.8
    fig = plt.figure(figsize=(24 * COL_INCHES, height))
    top = 1 - 0.8 / height  # room for the title
    queries = {(q.panel, q.ref): q for q in dashboard_queries(dashboard)}
    for panel in panels:
        g = panel["gridPos"]
        # Grafana's grid: 24 columns, rows of equal height; leave room for ticks and titles.
        left = g["x"] / 24 + 0.035
        width = g["w"] / 24 - 0.05
        cell_top = top * (1 - g["y"] / rows)
        cell_h = top * g["h"] / rows
        below, above = 0.45 / height, 0.35 / height  # tick labels, title (inches)
        ax = fig.add_axes((left, cell_top - cell_h + below, width, cell_h - below - above))
        ax.set_title(panel["title"], fontsize=11, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        mult, ylabel = scale(unit)
        targets = [queries[(panel["title"], t["refId"])] for t in panel["targets"]]
        if panel["type"] == "timeseries":
            for q in targets:
                for series in prom.query_range(q.promql(rate_interval), start, end, step):
                    xs = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                    ys = [float(v) * mult for _, v in series["values"]]
                    ax.plot(xs, ys, lw=1.6, label=legend(q.legend, series["metric"]) or q.ref)
            ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
            ax.xaxis.set_major_formatter(
                mdates.DateFormatter("%H:%M:%S" if end - start < 900 else "%H:%M")
            )
            ax.set_ylabel(ylabel, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="upper left")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif panel["type"] == "bargauge":
            labels, values = [], []
            for q in targets:
                for r in prom.query(q.promql(rate_interval), at=end):
                    labels.append(legend(q.legend, r["metric"]))
                    values.append(float(r["value"][1]) * mult)
            order = sorted(range(len(labels)), key=lambda i: labels[i])
            ax.bar([labels[i] for i in order], [values[i] for i in order], color="tab:green")
            ax.set_ylabel(ylabel, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3, axis="y")
        else:  # stat
            ax.axis("off")
            texts = []
            for q in targets:
                for r in prom.query(q.promql(rate_interval), at=end):
                    text_mode = panel.get("options", {}).get("textMode")
                    if text_mode == "name":
                        texts.append(legend(q.legend, r["metric"]))
                    else:
                        texts.append(fmt(float(r["value"][1]), unit))
            ax.text(
                0.5,
                0.4,
                "\n".join(texts) or "no data",
                ha="center",
                va="center",
                fontsize=18 if len("".join(texts)) < 14 else 13,
                transform=ax.transAxes,
            )
    fig.suptitle(
        title or dashboard.get("title", ""),
        fontsize=15,
        x=0.01,
        ha="left",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, bbox_inches="tight")
    plt.close(fig)
    try:  # a palette PNG is a third of the size, for committing it
        from PIL import Image

        with Image.open(out) as im:
            small = im.convert("RGB").quantize(colors=128)
        small.save(out, optimize=True)
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=15, help="window ending now")
    ap.add_argument("--step", type=float, default=5, help="seconds between points")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = ap.parse_args(argv)
    end = time.time()
    render(
        PrometheusClient(args.prometheus),
        args.out,
        end - 60 * args.minutes,
        end,
        args.step,
        args.rate_interval,
        args.dashboard,
    )
    print(args.out)


if __name__ == "__main__":
    main()
