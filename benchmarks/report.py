"""Rendering of loader benchmark records: a markdown table, the ratios, a PNG plot (matplotlib,
the ``plot`` extra, imported only here)."""
from __future__ import annotations

from pathlib import Path
from typing import List


def _label(r: dict) -> str:
    return r["variant"] + (f" (hw {r['hw_decoder_load']:g})" if "hw_decoder_load" in r else "")


def markdown_table(results: List[dict]) -> str:
    lines = ["| variant | M | images/s (median [min–max]) | views/s | CPU ms / image | epoch boundary ms | rounds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["num_views"], _label(r))):
        boundary = f"{r['epoch_boundary_s'] * 1e3:.1f}" if "epoch_boundary_s" in r else "–"
        lines.append(
            f"| {_label(r)} | {r['num_views']} | {r['images_per_s']:.1f} [{r['images_per_s_min']:.1f}–"
            f"{r['images_per_s_max']:.1f}] | {r['views_per_s']:.1f} | {r['cpu_s_per_image'] * 1e3:.2f} | "
            f"{boundary} | {len(r['repeats'])} |"
        )
    return "\n".join(lines)


def markdown_ratios(ratios: dict) -> str:
    """Ratio of medians, and in brackets the median of the per-round (paired) ratios."""
    from benchmarks.loader_bench import COMPARED

    keys = [key for other in COMPARED for key in ((f"images_per_s_vs_{other}", f"img/s ÷ {other}"),
                                                   (f"cpu_per_image_vs_{other}", f"CPU/img: {other} ÷ fused"))]
    keys.append(("views_per_s_vs_m1", "views/s ÷ views/s at M=1"))
    present = [(k, t) for k, t in keys if any(k in row for row in ratios.values())]
    if not present:
        return ""
    lines = ["| dali-fused at | " + " | ".join(t for _, t in present) + " |", "|---|" + "---:|" * len(present)]
    for m, row in ratios.items():
        cells = []
        for k, _ in present:
            cell = f"{row[k]:.2f}×" if k in row else "–"
            if f"{k}_paired" in row:
                cell += f" ({row[k + '_paired']:.2f}×)"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(ratio of medians; in brackets the median of the same-round ratios)"


def plot_loader(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    fig, (ax_v, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in sorted({_label(r) for r in results}):
        rows = sorted((r for r in results if _label(r) == label), key=lambda r: r["num_views"])
        ms = [r["num_views"] for r in rows]
        views = [r["views_per_s"] for r in rows]
        lo = [r["views_per_s"] - r["images_per_s_min"] * r["num_views"] for r in rows]
        hi = [r["images_per_s_max"] * r["num_views"] - r["views_per_s"] for r in rows]
        ax_v.errorbar(ms, views, yerr=[lo, hi], marker="o", capsize=3, label=label)
        cpu = [r["cpu_s_per_image"] * 1e3 for r in rows]
        clo = [(r["cpu_s_per_image"] - r["cpu_s_per_image_min"]) * 1e3 for r in rows]
        chi = [(r["cpu_s_per_image_max"] - r["cpu_s_per_image"]) * 1e3 for r in rows]
        ax_c.errorbar(ms, cpu, yerr=[clo, chi], marker="o", capsize=3, label=label)
    for ax, ylabel in ((ax_v, "views / s (median, min–max)"), (ax_c, "CPU ms per unique image (all processes)")):
        ax.set_xscale("log", base=2)
        ms_all = sorted({r["num_views"] for r in results})
        ax.set_xticks(ms_all, [str(m) for m in ms_all])
        ax.set_xlabel("M (views per image)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_v.legend(fontsize=8)
    s, m = record["settings"], record["machine"]
    where = m["gpu"]["name"] if m.get("gpu") and s["device"] == "cuda" else f"{m['cpu']} ({m['usable_cpus']} CPUs)"
    env = " ".join(f"{k}={v}" for k, v in (record.get("environment") or {}).items())
    fig.suptitle(f"Loader throughput, B={s['batch_size']}, {s['threads']} threads/workers, "
                 f"{s['image_size']}px, {s['device']} — {where}" + (f" — {env}" if env else ""), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
