"""Per-rank memory of DDP vs FSDP2 as stacked bars, from benchmarks/fsdp_memory.py's JSON.

    python benchmarks/fsdp_memory.py --world-sizes 8 64 --skip-measure
    python benchmarks/fsdp_memory_plot.py            # -> docs/fsdp_memory.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
PARTS = [("params", "parameters"), ("grads", "gradients"), ("adamw", "AdamW state"), ("ema", "post-hoc EMA (2)")]


def plot(results: dict, out: Path) -> Path:
    networks = list(results["memory"])
    fig, axes = plt.subplots(1, len(networks), figsize=(4.2 * len(networks), 3.6))
    for ax, name in zip(axes, networks):
        entry = results["memory"][name]
        columns = [("DDP", entry["ddp"])] + [(f"FSDP2\n{n} ranks", v) for n, v in entry["fsdp2"].items()]
        bottom = [0.0] * len(columns)
        for key, label in PARTS:
            heights = [c[key] / GIB for _, c in columns]
            ax.bar(range(len(columns)), heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, total in enumerate(bottom):
            ax.text(x, total, f"{total:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(columns)), [c for c, _ in columns])
        ax.set_title(f"{name} ({entry['params'] / 1e6:.0f}M parameters)")
        ax.set_ylabel("GiB per rank (fp32, no activations)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/fsdp_memory.json"))
    p.add_argument("--out", default=str(ROOT / "docs/fsdp_memory.png"))
    args = p.parse_args()
    print(plot(json.loads(Path(args.results).read_text()), Path(args.out)))


if __name__ == "__main__":
    main()
