"""The comparison plot: one column per sequence; bytes stored, save time, restore time.

    python benchmarks/plot.py benchmarks/results/compare.json benchmarks/results/compare.png

Top row: the repository's size on disk after each save (what a retention of
every checkpoint costs). Middle row: seconds per save (log scale: full saves
and no-change saves differ by 100x). Bottom row: seconds to restore the
latest save (warm page cache; cold too when measured).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MiB = 1 << 20

# One stable style per tool, so a tool looks the same in every panel.
STYLE: dict[str, dict[str, Any]] = {
    "apollo-cli": {"color": "#d62728", "marker": "o", "lw": 2.5},
    "apollo-api": {"color": "#ff7f0e", "marker": "o", "lw": 2.0, "ls": "--"},
    "original": {"color": "#7f7f7f", "marker": "s", "lw": 1.5},
    "torch-save": {"color": "#8c564b", "marker": "v", "lw": 1.5},
    "safetensors": {"color": "#e377c2", "marker": "^", "lw": 1.5},
    "restic": {"color": "#1f77b4", "marker": "D", "lw": 1.5},
    "restic-max": {"color": "#17becf", "marker": "D", "lw": 1.5, "ls": "--"},
    "borg": {"color": "#2ca02c", "marker": "P", "lw": 1.5},
    "borg-zstd3": {"color": "#bcbd22", "marker": "P", "lw": 1.5, "ls": "--"},
}


def plot(results: dict[str, Any], path: Path) -> None:
    """Write the PNG for ``results`` (compare.json's content) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    seqs = [s for s in results["sequences"] if s.get("tools")]
    if not seqs:
        return
    fig, axes = plt.subplots(
        3,
        len(seqs),
        figsize=(4.6 * len(seqs), 11),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 3, 2]},
    )
    handles: dict[str, Any] = {}
    for col, seq in enumerate(seqs):
        labels = [v["label"] for v in seq["versions"]]
        x = list(range(len(labels)))
        ax_b, ax_t, ax_r = axes[0][col], axes[1][col], axes[2][col]
        restore_names, warm, cold = [], [], []
        for key, rec in seq["tools"].items():
            saves = rec["saves"]
            if not saves:
                continue
            st = STYLE.get(key, {})
            kw = {
                "color": st.get("color"),
                "marker": st.get("marker", "o"),
                "linewidth": st.get("lw", 1.5),
                "linestyle": st.get("ls", "-"),
                "markersize": 5,
            }
            (h,) = ax_b.plot(x[: len(saves)], [s["bytes_on_disk"] / MiB for s in saves], **kw)
            ax_t.plot(x[: len(saves)], [max(s["seconds"], 1e-3) for s in saves], **kw)
            handles.setdefault(rec["label"], h)
            if rec["restore"]:
                restore_names.append(key + ("*" if rec.get("restore_to") == "memory" else ""))
                warm.append(rec["restore"].get("warm", {}).get("seconds", 0.0))
                cold.append(rec["restore"].get("cold", {}).get("seconds", 0.0))
        ax_b.set_title(
            f"{seq['title']}\n({seq['logical_bytes'] / MiB:,.0f} MiB per version)", fontsize=10
        )
        for ax in (ax_b, ax_t):
            ax.set_xticks(x, labels)
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        ax_b.set_ylim(bottom=0)
        if col == 0:
            ax_b.set_ylabel("stored on disk after each save (MiB)")
            ax_t.set_ylabel("save time (s, log)")
            ax_r.set_ylabel("restore latest (s; * into memory)")
        pos = list(range(len(restore_names)))
        colors = [STYLE.get(k.rstrip("*"), {}).get("color", "grey") for k in restore_names]
        ax_r.bar([p - 0.2 for p in pos], warm, width=0.4, color=colors, label="warm")
        if any(cold):
            ax_r.bar(
                [p + 0.2 for p in pos],
                cold,
                width=0.4,
                color=colors,
                alpha=0.45,
                hatch="//",
                label="cold",
            )
            if col == 0:
                ax_r.legend(fontsize=8)
        ax_r.set_xticks(pos, restore_names, rotation=45, ha="right", fontsize=8)
        ax_r.grid(True, axis="y", alpha=0.3)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(5, len(handles)),
        fontsize=9,
        frameon=False,
    )
    env = results.get("env", {})
    fig.suptitle(
        f"apollo_cas vs. alternatives: {env.get('cores', '?')} cores, "
        f"{env.get('filesystem', '?')} disk, saves with "
        f"{'cold' if results.get('config', {}).get('cold') else 'warm'} caches "
        "(CLI tools include process start; apollo API / torch / safetensors / original "
        "are in-process)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
