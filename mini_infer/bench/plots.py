"""PNG plots of benchmark JSON: tok/s and % of roofline vs batch size, throughput vs transformers.

matplotlib is the optional `bench` extra, so it is imported only when a plot is drawn.
Usage: python -m mini_infer.bench.plots --latency L.json --throughput T1.json T2.json --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("plots need matplotlib: pip install 'mini-infer[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(record: dict[str, Any], path: str | Path) -> Path:
    """Decode tok/s (left) and % of HBM bandwidth and of the roofline (right) against batch size."""
    plt = _pyplot()
    rows = sorted(record["results"], key=lambda r: r["batch_size"])
    batch = [r["batch_size"] for r in rows]
    from matplotlib.ticker import NullLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(batch, [r["decode_tok_per_s"] for r in rows], marker="o", label="decode tok/s (all sequences)")
    left.plot(batch, [r["per_sequence_tok_per_s"] for r in rows], marker="s", label="tok/s per sequence")
    left.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens / s")
    left.set_xticks(batch, [str(b) for b in batch])
    left.xaxis.set_minor_locator(NullLocator())
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    for key, label in (
        ("hbm_fraction", "achieved / measured HBM bandwidth"),
        ("roofline_fraction", "roofline ideal step / measured step"),
    ):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            right.plot(batch, [100 * v if v is not None else float("nan") for v in values], marker="o", label=label)
    right.set(xscale="log", xlabel="batch size", ylabel="%", ylim=(0, 105))
    right.set_xticks(batch, [str(b) for b in batch])
    right.xaxis.set_minor_locator(NullLocator())
    right.set_xlim(left.get_xlim())
    right.grid(True, alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend()
    else:
        right.text(0.5, 0.5, "n/a without a GPU", ha="center", transform=right.transAxes)
    hw = record.get("hardware") or {}
    title = f"{record['model']} decode, input {record['input_len']}, output {record['output_len']}"
    if hw:
        title += f" - {record['environment']['device']}, {hw['hbm_gb_per_s']:.0f} GB/s measured"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_throughput(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Output tok/s of every run of every throughput record (one group per model), log scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 4.5), squeeze=False)
    for ax, record in zip(axes[0], records):
        runs = record["runs"]
        labels = [r["backend"] for r in runs]
        values = [r["output_tok_per_s"] for r in runs]
        bars = ax.bar(range(len(runs)), values, color=["C0" if "mini-infer" in b else "C1" for b in labels])
        for bar, run in zip(bars, runs):
            at_most = "≤ " if run.get("extra", {}).get("stopped_at_time_limit") is not None else ""
            note = f"{at_most}{run['output_tok_per_s']:.0f}"
            if run.get("roofline_fraction") is not None:
                note += f"\n{at_most}{100 * run['roofline_fraction']:.0f}% roof"
            ax.annotate(
                note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        ax.set_xticks(range(len(runs)), [f"{b}\n({r['num_requests']} req)" for b, r in zip(labels, runs)], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"{record['model']} ({record['dtype']})")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle("offline throughput, same requests side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mini_infer.bench.plots")
    parser.add_argument("--latency", nargs="*", default=[], help="latency JSON files")
    parser.add_argument("--throughput", nargs="*", default=[], help="throughput JSON files, one per panel")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.latency:
        record = json.loads(Path(name).read_text())
        if record.get("results"):
            print(plot_latency(record, out / f"{Path(name).stem}.png"))
    records = [json.loads(Path(n).read_text()) for n in args.throughput]
    records = [r for r in records if r.get("runs")]
    if records:
        print(plot_throughput(records, out / "throughput.png"))


if __name__ == "__main__":
    main()
