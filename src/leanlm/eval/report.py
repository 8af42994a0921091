"""``leanlm compare``'s outputs: ``report.md`` (one table row per grid cell) and three plots —
perplexity against bits per method, quality against size (the Pareto view), decode speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leanlm.fsutil import atomic_write


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summary(cell: dict) -> dict:
    """The cell's headline numbers (task measures averaged over the tasks)."""
    tasks = cell.get("tasks", {}).values()
    return {"ppl": cell.get("perplexity", {}).get("ppl", float("nan")),
            "acc": _mean([t["acc"] for t in tasks]), "acc_norm": _mean([t["acc_norm"] for t in tasks]),
            "flips": _mean([t["flips"] for t in tasks if "flips" in t]) if cell["method"] != "full" else 0.0}


def _fmt(x: object, spec: str) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "—"
    return format(x, spec)


def write_report(cells: list[dict], out: Path, title: str) -> Path:
    full = summary(cells[0])
    lines = [f"# {title}", "",
             "Perplexity: GPTQ protocol; KL: mean next-token KL(full ‖ quantized) on the same windows; "
             "acc / acc_norm / flips: means over the tasks; memory: the model's tensors, disk: its "
             "checkpoint (bf16 outside the quantized linears); peak RSS: a fresh process that loaded it, "
             "while it generates 64 tokens after 256, and what generating adds; speed: batch 1, bf16.", "",
             "| method | bits | group | ppl | Δppl % | KL | acc | acc_norm | flips | memory MiB | "
             "disk MiB | peak RSS MiB | generating adds MiB | prefill tok/s | decode tok/s | quantize s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['method']} | {c['bits']} | {c['group_size']} | failed: {c['error']} |"
                         + " |" * 12)
            continue
        s = summary(c)
        delta = 100 * (s["ppl"] / full["ppl"] - 1)
        lines.append(
            f"| {c['method']} | {c['bits']} | {c['group_size'] or '—'} | {_fmt(s['ppl'], '.3f')} | "
            f"{_fmt(delta, '+.2f')} | {_fmt(c.get('kl'), '.2e')} | {_fmt(s['acc'], '.3f')} | "
            f"{_fmt(s['acc_norm'], '.3f')} | {_fmt(s['flips'], '.3f')} | "
            f"{_fmt(c.get('memory_mib'), '.1f')} | {_fmt(c.get('disk_mib'), '.1f')} | "
            f"{_fmt(c.get('peak_rss_mib'), '.0f')} | {_fmt(c.get('generation_mib'), '.2f')} | "
            f"{_fmt(c.get('prefill_tok_s'), '.0f')} | {_fmt(c.get('decode_tok_s'), '.1f')} | "
            f"{_fmt(c.get('quantize_s'), '.1f')} |")
    lines += ["", "![perplexity vs bits](ppl_vs_bits.png)", "", "![quality vs size](quality_vs_size.png)", "",
              "![decode speed](decode_speed.png)", ""]
    _plots(cells, out)
    return atomic_write(out / "report.md", "\n".join(lines))


def _plots(cells: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cells[1:] if "error" not in c]
    full = cells[0]
    methods = sorted({c["method"] for c in ok})

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((c["bits"], summary(c)["ppl"]) for c in ok if c["method"] == m)
        ax.plot(*zip(*pts, strict=True), marker="o", label=m.upper())
    ax.axhline(summary(full)["ppl"], color="grey", linestyle="--", label="full precision")
    ax.set_xticks(sorted({c["bits"] for c in ok}))
    _finish(fig, ax, out / "ppl_vs_bits.png", "weight bits", "perplexity (lower is better)",
            "Perplexity vs bits")

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        cs = [c for c in ok if c["method"] == m]
        ax.scatter([c["memory_mib"] for c in cs], [summary(c)["ppl"] for c in cs], label=m.upper())
        for c in cs:
            ax.annotate(f"W{c['bits']}", (c["memory_mib"], summary(c)["ppl"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.scatter([full["memory_mib"]], [summary(full)["ppl"]], marker="*", s=120, color="black",
               label="full precision")
    _finish(fig, ax, out / "quality_vs_size.png", "model size in memory (MiB)",
            "perplexity (lower is better)", "Quality vs size")

    fig, ax = plt.subplots(figsize=(7, 4))
    shown = [full, *ok]
    speeds = [c.get("decode_tok_s", 0.0) for c in shown]
    ax.bar(range(len(shown)), speeds, color=["black"] + ["C0"] * len(ok))
    ax.set_xticks(range(len(shown)), ["full" if c is full else f"{c['method']}\nW{c['bits']}" for c in shown],
                  fontsize=8)
    _finish(fig, ax, out / "decode_speed.png", None, "decode tokens/s (batch 1, bf16)", "Decode speed",
            legend=False)


def _finish(fig: object, ax: object, path: Path, xlabel: str | None, ylabel: str, title: str,
            legend: bool = True) -> None:
    """Label, lay out, save and close one figure."""
    import matplotlib.pyplot as plt

    if xlabel:
        ax.set_xlabel(xlabel)  # type: ignore[attr-defined]
    ax.set_ylabel(ylabel)  # type: ignore[attr-defined]
    ax.set_title(title)  # type: ignore[attr-defined]
    if legend:
        ax.legend()  # type: ignore[attr-defined]
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=120)  # type: ignore[attr-defined]
    plt.close(fig)
