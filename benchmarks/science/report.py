"""Turn the finished runs of repro_fashion_mnist.py into results.json, results.md and PNG plots."""
from __future__ import annotations

import json
import platform
import statistics as st
from pathlib import Path

DIAG_KEYS = ("noise_trace", "noise_scale", "grad_norm2", "view_grad_var_rel", "ba_var_reduction")


def _curves(run: dict, out: Path, read_metrics) -> dict | None:
    path = out / "runs" / run["name"] / "metrics.jsonl"
    if not path.is_file():
        return None
    kinds = read_metrics(path)
    start = next((e for e in kinds.get("event", []) if e.get("event") == "start"), {})
    evals = kinds.get("eval", [])
    if not evals:
        return None
    samples_per_step = 64 * run["views"]
    return {
        **run,
        "total_steps": start.get("total_steps"),
        "finished": any(e.get("event") == "end" for e in kinds.get("event", [])),
        "eval": [{"step": e["step"], "samples": e["step"] * samples_per_step, "time": e["time"],
                  "top1": e["val_top1"], "loss": e["val_loss"]} for e in evals],
        "diag": [{"step": d["step"], **{k: d.get(k) for k in DIAG_KEYS}} for d in kinds.get("diag", [])],
        "final_top1": evals[-1]["val_top1"],
        "wall_s": evals[-1]["time"],
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return st.mean(values), (st.stdev(values) if len(values) > 1 else 0.0)


def _first_reach(curve: list[dict], target: float) -> int | None:
    return next((p["step"] for p in curve if p["top1"] >= target), None)


def analyse(results: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["views"], r["budget"]), []).append(r)
    base = sorted(groups.get((1, 1.0), []), key=lambda r: r["seed"])
    ba = sorted(groups.get((4, 1.0), []), key=lambda r: r["seed"])
    findings: dict = {"groups": {}}
    for (views, budget), runs in sorted(groups.items()):
        mean, sd = _mean_sd([r["final_top1"] for r in runs])
        findings["groups"][f"M={views} budget={budget:g}"] = {
            "views": views, "budget": budget, "seeds": [r["seed"] for r in runs], "steps": runs[0]["eval"][-1]["step"],
            "final_top1": [r["final_top1"] for r in runs], "mean": mean, "sd": sd,
            "wall_s_mean": st.mean(r["wall_s"] for r in runs),
            # Medians over all measurements of all seeds: single measurements are very noisy.
            "diag_median": {k: st.median(v) for k in DIAG_KEYS
                            if (v := [d[k] for r in runs for d in r["diag"] if d.get(k) is not None])}}
    if base and ba:
        paired = {r["seed"]: r["final_top1"] for r in base}
        gains = [r["final_top1"] - paired[r["seed"]] for r in ba if r["seed"] in paired]
        base_mean = st.mean(paired.values())
        findings["equal_steps"] = {
            "baseline_mean": base_mean, "ba_mean": st.mean(r["final_top1"] for r in ba),
            "gain_per_seed": gains, "mean_gain": st.mean(gains) if gains else None,
            "ba_wins_every_seed": bool(gains) and all(g > 0 for g in gains),
            "baseline_not_starved": base_mean >= 88.5,
        }
        reached = [g["budget"] for g in findings["groups"].values() if g["views"] == 4 and g["mean"] >= base_mean]
        findings["fewer_steps"] = {
            "smallest_budget_reaching_baseline": min(reached, default=None),
            # On the full-budget M=4 curves: first evaluated step at or above the baseline's final mean.
            "full_curve_fraction": [
                (s / r["eval"][-1]["step"]) if (s := _first_reach(r["eval"], base_mean)) else None for r in ba],
        }
    return findings


def _markdown(findings: dict) -> str:
    lines = ["| run | steps | test top-1 % (mean ± sd) | per seed | wall s (mean) |", "|---|---|---|---|---|"]
    for name, g in findings["groups"].items():
        per_seed = ", ".join(f"{v:.2f}" for v in g["final_top1"])
        lines.append(
            f"| {name} | {g['steps']} | {g['mean']:.2f} ± {g['sd']:.2f} | {per_seed} | {g['wall_s_mean']:.0f} |"
        )
    diag = {name: g["diag_median"] for name, g in findings["groups"].items() if g["budget"] == 1.0 and g["diag_median"]}
    if diag:
        lines += [
            "",
            "| run (full budget) | median tr(Σ) per image | median B_simple | median variance reduction (M=1 ÷ BA) |",
            "|---|---|---|---|",
        ]
        for name, d in diag.items():
            cells = [f"{d[k]:.3g}" if k in d else "–" for k in ("noise_trace", "noise_scale", "ba_var_reduction")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    eq, few = findings.get("equal_steps"), findings.get("fewer_steps")
    if eq:
        lines += [
            "",
            f"Equal steps: M=4 − M=1 per seed = {', '.join(f'{g:+.2f}' for g in eq['gain_per_seed'])} points; "
            f"mean gain {eq['mean_gain']:+.2f}; M=4 above M=1 on every seed: {eq['ba_wins_every_seed']}; "
            f"baseline mean {eq['baseline_mean']:.2f}% (≥ 88.5: {eq['baseline_not_starved']}).",
        ]
    if few:
        fractions = ", ".join("not reached" if f is None else f"{f:.2f}" for f in few["full_curve_fraction"])
        lines += [
            f"Fewer steps: smallest M=4 budget whose mean reaches the M=1 full-budget mean: "
            f"{few['smallest_budget_reaching_baseline']}; on the full M=4 curves the M=1 final mean is first "
            f"reached at these fractions of the steps: {fractions}."
        ]
    return "\n".join(lines) + "\n"


def _plot(results: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {(1, 1.0): "tab:blue", (4, 1.0): "tab:red", (4, 0.75): "tab:orange", (4, 0.5): "tab:green"}
    written = []
    for axis, label in (("step", "SGD steps"), ("samples", "training samples (views)"), ("time", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        seen = set()
        for r in results:
            key = (r["views"], r["budget"])
            ax.plot(
                [p[axis] for p in r["eval"]],
                [p["top1"] for p in r["eval"]],
                color=colours.get(key, "grey"),
                alpha=0.8,
                lw=1.2,
                label=None if key in seen else f"M={key[0]}, budget {key[1]:g}",
            )
            seen.add(key)
        ax.set_xlabel(label), ax.set_ylabel("test top-1 (%)"), ax.set_ylim(80, None), ax.grid(alpha=0.3)
        ax.legend(), ax.set_title(f"Fashion-MNIST, ResNet-8: test accuracy vs {label}")
        name = f"accuracy_vs_{axis}.png"
        fig.tight_layout(), fig.savefig(out / name, dpi=110), plt.close(fig)
        written.append(name)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        (axes[0], "noise_trace", "tr(Σ): per-image gradient variance (rolling median)"),
        (axes[1], "ba_var_reduction", "M=4: gradient variance of M=1 ÷ of BA (rolling median)"),
    )
    for ax, key, title in panels:
        for r in results:
            pts = [(d["step"], d[key]) for d in r["diag"] if d.get(key) is not None] if r["budget"] == 1.0 else []
            if len(pts) >= 5:  # single measurements scatter over decades: show a 5-point rolling median
                steps = [p[0] for p in pts[2:-2]]
                smooth = [st.median(v for _, v in pts[i - 2 : i + 3]) for i in range(2, len(pts) - 2)]
                ax.plot(
                    steps,
                    smooth,
                    color=colours[(r["views"], 1.0)],
                    alpha=0.8,
                    label=f"M={r['views']}" if r["seed"] == 0 else None,
                )
        ax.set_xlabel("SGD steps"), ax.set_title(title, fontsize=10), ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[1].axhline(1.0, color="grey", ls="--", lw=1)
    fig.tight_layout(), fig.savefig(out / "gradient_noise.png", dpi=110), plt.close(fig)
    return written + ["gradient_noise.png"]


def write_report(runs: list[dict], out: Path, read_metrics) -> str:
    # Only finished runs: a run still in progress (or interrupted) would bias the means.
    results = [c for r in runs if (c := _curves(r, out, read_metrics)) is not None and c["finished"]]
    if not results:
        return "no finished runs yet"
    findings = analyse(results)
    table = _markdown(findings)
    plots = _plot(results, out)
    import nvidia.dali
    import torch

    from dali_ba.provenance import git_commit

    meta = {
        **git_commit(),
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "nvidia-dali": nvidia.dali.__version__,
        },
    }
    (out / "results.json").write_text(json.dumps({**meta, "findings": findings, "runs": results}, indent=1))
    (out / "results.md").write_text(
        "# Fashion-MNIST: batch augmentation M=4 vs M=1\n\n" + table + "\nPlots: " + ", ".join(plots) + "\n"
    )
    return table
