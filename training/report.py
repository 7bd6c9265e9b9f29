"""Rendering of evaluation summaries (the dicts of `training.evaluate.EvalResult.summary()`).

Pure: takes summary dicts, returns Markdown text or writes one PNG. The table follows the paper's
Table 1: one row per model, normalized rank (lower is better) and HR@k (higher is better) for
observed events, new users, new items (with each partition's share of the events) and in total; a
dash where the model does not serve a partition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

PARTITION_TITLES = {"observed": "observed", "new_user": "new users", "new_item": "new items",
                    "first_item": "first interaction of an item"}
DASH = "–"


def _fmt(value: float | None) -> str:
    return DASH if value is None else f"{value:.3f}"


def rules_title(summary: dict[str, Any]) -> str:
    """The evaluation rules every title states: "protocol serve, already-seen items excluded (last 64)"."""
    n = summary.get("exclude_recent", 0)  # summaries written before the rule existed excluded nothing
    seen = f"already-seen items excluded (last {n})" if n else "already-seen items not excluded"
    return f"protocol {summary.get('protocol', 'serve')}, {seen}"


def table1_markdown(summaries: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Markdown table: rows = models; columns = rank and HR@k per partition and in total."""
    if not summaries:
        return "(no results)\n"
    first = summaries[0]
    k = first["hr_k"]
    groups = [(name, f"{label} ({first['partitions'][name]['share']:.1%})")
              for name, label in PARTITION_TITLES.items()]
    header = ["model"]
    for _, label in groups + [("total", f"total ({first['n_events']} events)")]:
        header += [f"{label} rank ↓", f"{label} HR@{k} ↑"]
    protocol = first.get("protocol", "serve")
    lines = [f"**{title}** ({rules_title(first)})", ""] if title else [f"({rules_title(first)})", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    for summary in summaries:
        cells = [summary["model"]]
        for name, _ in groups:
            part = summary["partitions"][name]
            cells += [_fmt(part["rank"]), _fmt(part["hit_rate"])]
        cells += [_fmt(summary["total"]["rank"]), _fmt(summary["total"]["hit_rate"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Normalized rank over the items met before each event (0 best, 0.5 random); HR@{k} against "
             f"{first['num_negatives']} sampled negatives. {DASH}: partition not served by the model; "
             f"total = served partitions" + (", without first interactions of items (no model can serve an item "
                                             "before it exists)." if protocol == "serve" else ".") +
             EXCLUDED_NOTE * bool(first.get("exclude_recent"))]
    return "\n".join(lines + [""] + notes) + "\n"


EXCLUDED_NOTE = (" Already-seen items: the items of the user's last n interactions before the event score -inf "
                  "for every model (what the query API leaves out), a repeat of one of them included; HR@k "
                  "negatives are drawn from the other items.")


def plot_rank_vs_prior(summaries: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """PNG of mean rank vs the item's prior interactions (log-binned), one line per model (paper Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for summary in summaries:
            bins = summary.get("rank_by_prior") or []
            if not bins:
                continue
            x = [max(b["lo"], 0.5) if b["lo"] == b["hi"] else (b["lo"] * b["hi"]) ** 0.5 for b in bins]
            ax.plot(x, [b["rank"] for b in bins], marker="o", label=summary["model"])
        ax.set_xscale("log")
        ax.set_xlabel("interactions of the item before the event (log bins; 0 plotted at 0.5)")
        ax.set_ylabel("mean normalized rank (lower is better)")
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title or "Rank vs item history")
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
