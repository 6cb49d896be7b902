"""PNG plots from bench/results/*.json (matplotlib, Agg backend; the ``bench`` extra).

    python bench/plots.py            # every plot whose JSON is present

Writes peers.png, throughput.png (and throughput_matrix.png when the matrix ran),
latency.png, scaling.png and memory.png beside the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _machine(report: dict) -> str:
    m = report.get("machine", {})
    return f"{m.get('cpu_model') or ''} {m.get('cpus', '?')} CPUs, {report.get('when', '')}".strip()


def bars(plt, report: dict, title: str, out: str, colours: dict) -> None:
    clients = {k: v for k, v in report["clients"].items() if "error" not in v}
    if not clients:
        return
    names = list(clients)
    cpu = [clients[n]["cpu_us_per_push"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars_ = ax.bar(names, cpu, color=[colours.get(n, "#888888") for n in names])
    for b, n in zip(bars_, names, strict=True):
        ax.annotate(f"{clients[n]['cpu_us_per_push']:.0f} µs\n{clients[n]['pushes_per_s']:,}/s",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("client CPU µs per push (lower is better)")
    ax.set_ylim(0, max(cpu) * 1.25)
    ax.set_title(title, fontsize=10)
    fig.text(0.99, 0.01, _machine(report), ha="right", fontsize=7, color="#666666")
    fig.tight_layout()
    fig.savefig(RESULTS / out, dpi=110)
    plt.close(fig)


COLOURS = {"fanout": "#1f77b4", "floor": "#aec7e8", "aioapns": "#ff7f0e",
           "node-apn": "#2ca02c", "apns2": "#98df8a"}


def plot_latency(plt, report: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for srv, style in zip(report["servers"], ("-", "--"), strict=False):
        levels = [lv for lv in srv["levels"] if "error" not in lv]
        if not levels:
            continue
        x = [lv["level"] * 100 for lv in levels]
        label = f"{srv['server']} ({srv['injected_ms']:g} ms injected)"
        for pct, marker in (("p50", "o"), ("p99", "s")):
            ax.plot(x, [max(lv["added_e2e_ms"][pct], 0.01) for lv in levels], style,
                    marker=marker, label=f"{label} {pct}")
    ax.axhline(5, color="red", lw=0.8, ls=":", label="target: p99 <= 5 ms at 50%")
    ax.set_yscale("log")
    ax.set_xlabel("load, % of the measured maximum rate")
    ax.set_ylabel("added latency, end to end, ms (log)")
    ax.set_xticks([10, 50, 90])
    ax.legend(fontsize=7)
    ax.set_title("fanout: added latency against load (paced by rate=)", fontsize=10)
    fig.text(0.99, 0.01, _machine(report), ha="right", fontsize=7, color="#666666")
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png", dpi=110)
    plt.close(fig)


def plot_scaling(plt, report: dict) -> None:
    ws = {int(k): v for k, v in report["workers"].items() if "error" not in v}
    if not ws:
        return
    xs = sorted(ws)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [ws[w]["pushes_per_s"] for w in xs], "o-", label="wall (start to exit)")
    ax.plot(xs, [ws[w].get("steady_pushes_per_s") or 0 for w in xs], "s--",
            label="steady (20-80% of results)")
    base = ws[1]["pushes_per_s"]
    ax.plot(xs, [base * w for w in xs], ":", color="#999999", label="linear")
    ax.plot([2], [base * 1.7], "r*", label="target at 2 workers (1.7x)")
    ax.set_xticks(xs)
    ax.set_xlabel("fanout run --workers N")
    ax.set_ylabel("pushes/s")
    ax.set_ylim(0, None)
    ax.legend(fontsize=7)
    ax.set_title(f"fanout run: scaling over {report['lines']:,} lines", fontsize=10)
    fig.text(0.99, 0.01, _machine(report), ha="right", fontsize=7, color="#666666")
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=110)
    plt.close(fig)


def plot_memory(plt, report: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    lib = report.get("library") or {}
    if lib.get("samples"):
        ax.plot([s["done"] / 1e6 for s in lib["samples"]], [s["rss_mb"] for s in lib["samples"]],
                label="library fan_out (generator of tokens)")
    daemon = load("daemon_rss")
    if daemon and daemon.get("samples"):
        ax.plot([s["line"] / 1e6 for s in daemon["samples"]],
                [s["rss_mb"] for s in daemon["samples"]], label="daemon fanout run (NDJSON)")
    ax.set_xlabel("pushes done (millions)")
    ax.set_ylabel("RSS, MB")
    ax.set_ylim(0, None)
    ax.legend(fontsize=8)
    ax.set_title("fanout: RSS while pushing", fontsize=10)
    fig.text(0.99, 0.01, _machine(report), ha="right", fontsize=7, color="#666666")
    fig.tight_layout()
    fig.savefig(RESULTS / "memory.png", dpi=110)
    plt.close(fig)


def plot_matrix(plt, report: dict) -> None:
    """One panel per (server latency, rejection); in each, pushes/s by connections with one
    bar per (stream limit, payload)."""
    cells = [c for c in report.get("matrix", []) if "error" not in c]
    if not cells:
        return
    lats = sorted({c["latency_ms"] for c in cells})
    rejs = sorted({c["reject"] for c in cells})
    conns = sorted({c["connections"] for c in cells})
    series = sorted({(c["streams"], c["payload_bytes"]) for c in cells})
    fig, axes = plt.subplots(len(lats), len(rejs), figsize=(5 * len(rejs), 3.2 * len(lats)),
                             squeeze=False)
    width = 0.8 / len(series)
    cmap = plt.get_cmap("tab10")
    for i, lat in enumerate(lats):
        for j, rej in enumerate(rejs):
            ax = axes[i][j]
            busy = []
            for k, (streams, size) in enumerate(series):
                ys = []
                for cn in conns:
                    c = next((c for c in cells if c["latency_ms"] == lat and c["reject"] == rej
                              and c["connections"] == cn and c["streams"] == streams
                              and c["payload_bytes"] == size), None)
                    ys.append(c["pushes_per_s"] if c else 0)
                    if c:
                        busy.append(c["server_busy"])
                ax.bar([x + k * width for x in range(len(conns))], ys, width,
                       color=cmap(k), label=f"{streams} streams, {size:,} B")
            ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(conns))])
            ax.set_xticklabels([f"{c} conn" for c in conns])
            srv = "nginx" if not lat else "mock"
            ax.set_title(f"{srv}, latency {'20±10 ms' if lat else '0'}, {rej:.0%} rejected; "
                         f"server busy up to {max(busy or [0]):.0%}", fontsize=8)
            ax.set_ylabel("pushes/s", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("fanout throughput over the matrix (one run per cell)", fontsize=10)
    fig.text(0.99, 0.005, _machine(report), ha="right", fontsize=7, color="#666666")
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput_matrix.png", dpi=100)
    plt.close(fig)


def main() -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if (r := load("peers")) is not None:
        bars(plt, r, f"fanout and its peers: client CPU per push ({r['n']:,} pushes, "
             f"median of {r['rounds']} rounds)", "peers.png", COLOURS)
        made.append("peers.png")
    if (r := load("throughput")) is not None:
        bars(plt, r, f"fanout vs the bare framer loop vs aioapns ({r['n']:,} pushes)",
             "throughput.png", COLOURS)
        made.append("throughput.png")
    matrix = r if (r := load("throughput")) is not None and r.get("matrix") else load(
        "throughput_matrix")
    if matrix and matrix.get("matrix"):
        plot_matrix(plt, matrix)
        made.append("throughput_matrix.png")
    if (r := load("latency")) is not None:
        plot_latency(plt, r)
        made.append("latency.png")
    if (r := load("scaling")) is not None:
        plot_scaling(plt, r)
        made.append("scaling.png")
    if (r := load("memory")) is not None:
        plot_memory(plt, r)
        made.append("memory.png")
    print("plots: " + ", ".join(str(RESULTS / m) for m in made))


if __name__ == "__main__":
    main()
