"""Reporting for the benchmark: the stdout/markdown table, JSON, PNG (the machine stamp is ``harness``'s)."""
from __future__ import annotations

import json
from typing import Any, Optional

MiB = 2**20

# (header, key, formatter) -- the columns of the stdout and markdown tables
COLUMNS = (
    ("method", "method", str),
    ("trainable params", "trainable_params", lambda v: f"{v:,}"),
    ("params MiB", "param_bytes", lambda v: f"{v / MiB:.1f}"),
    ("grads MiB", "grad_bytes", lambda v: f"{v / MiB:.1f}"),
    ("opt state MiB", "optimizer_state_bytes", lambda v: f"{v / MiB:.1f}"),
    ("p+g+s peak MiB", "accounted_peak_bytes", lambda v: f"{v / MiB:.1f}"),
    ("peak MiB", "peak_memory_bytes", lambda v: f"{v / MiB:.0f}"),
    ("traced peak MiB", "traced_peak_bytes", lambda v: f"{v / MiB:.0f}"),
    ("tokens/s [p10-p90]", "tokens_per_s", None),
    ("final loss", "final_train_loss", lambda v: f"{v:.3f}"),
    ("eval loss", "eval_loss", lambda v: f"{v:.3f}"),
    ("eval acc", "eval_accuracy", lambda v: f"{100 * v:.1f}%"),
    ("wall s", "wall_s", lambda v: f"{v:.0f}"),
)


def _cell(row: dict[str, Any], key: str, fmt) -> str:
    if key == "method":
        return row["method"]
    if row.get("status") != "ok":
        return ""
    if key == "tokens_per_s":
        return f"{row['tokens_per_s']:.0f} [{row['tokens_per_s_p10']:.0f}-{row['tokens_per_s_p90']:.0f}]"
    value = row.get(key)
    return "n/a" if value is None else fmt(value)


def table_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = [c[0] for c in COLUMNS]
    rows = []
    for r in results:
        cells = [_cell(r, key, fmt) for _, key, fmt in COLUMNS]
        if r.get("status") != "ok":
            cells[1] = "FAILED: " + r.get("error", "?")[:160] + (f" -- install: {r['install']}" if r.get("install") else "")
        rows.append(cells)
    return headers, rows


def text_table(results: list[dict[str, Any]]) -> str:
    headers, rows = table_rows(results)
    ok_rows = [r for r, res in zip(rows, results) if res.get("status") == "ok"]
    widths = [max([len(h)] + [len(r[i]) for r in ok_rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for cells, res in zip(rows, results):
        if res.get("status") == "ok":
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
        else:
            lines.append(f"{cells[0].ljust(widths[0])}  {cells[1]}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    headers, rows = table_rows(report["results"])
    meta, cfg, m = report["meta"], report["config"], report["meta"]["machine"]
    out = [
        f"# OwLore benchmark: {meta['model_name']}, {meta['date']}",
        "",
        f"- model: {meta['model_source']}",
        f"- data: {meta['dataset']}",
        "- config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()),
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB; {m['platform']}"
        + (f"; GPU {m['gpu']}" if m.get("gpu") else "")
        + (f"; load average at the end {m['load_average_1_5_15m']}" if m.get("load_average_1_5_15m") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- total wall time: {meta['wall_s']:.0f} s",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    out += ["", "## Measured vs traced (owlore_kernels.estimate_memory, the same step on fake tensors)", "",
            "| method | p+g+s after a step MiB meas/traced | deviation | peak MiB meas/traced | traced peak in | "
            "traced at the peak: weights / grads / state / proj / activations+tmp MiB |",
            "|---|---|---|---|---|---|"]
    for r in report["results"]:
        est = r.get("estimate")
        if r.get("status") != "ok" or not est:
            continue
        parts = " / ".join(f"{est[k] / MiB:.1f}" for k in ("weights", "gradients", "optimizer_state", "projection",
                                                           "activations"))
        out.append(f"| {r['method']} | {r['accounted_peak_bytes'] / MiB:.2f} / {est['accounted'] / MiB:.2f} | "
                   f"{100 * r['estimate_max_rel_error']:.2f}% | {r['peak_memory_bytes'] / MiB:.0f} "
                   f"({r['peak_memory_kind']}) / {est['peak'] / MiB:.0f} | {est['phase']} | {parts} |")
    out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: str) -> Optional[str]:
    """Memory vs throughput scatter and loss curves; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in report["results"] if r.get("status") == "ok"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in ok:
        x = r["accounted_peak_bytes"] / MiB
        dot = ax1.scatter(x, r["tokens_per_s"], s=60)
        ax1.errorbar(x, r["tokens_per_s"], yerr=[[r["tokens_per_s"] - r["tokens_per_s_p10"]],
                                                  [r["tokens_per_s_p90"] - r["tokens_per_s"]]], fmt="none",
                     alpha=0.5, color=dot.get_facecolor()[0], capsize=3)
        ax1.annotate(r["method"], (x, r["tokens_per_s"]), textcoords="offset points", xytext=(6, 6))
        ax2.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["method"], marker=".")
    ax1.set_xlabel("params + grads + optimizer state at peak (MiB)")
    ax1.set_ylabel("tokens/s (median, p10-p90)")
    ax1.set_title("memory vs throughput")
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (answer tokens)")
    ax2.set_title("loss curves")
    ax2.grid(alpha=0.3)
    if ok:
        ax2.legend()
    meta = report["meta"]
    fig.suptitle(f"{meta['model_name']} -- {report['config']['steps']} steps, batch {report['config']['batch']}, "
                 f"seq {report['config']['seq_len']}, {report['config']['dtype']}, {report['config']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
