"""The report's figures, drawn with matplotlib's Agg canvas into PNG bytes.

Figures are built as `matplotlib.figure.Figure` objects, not through pyplot:
no global state, no display backend, safe in a driver's threads.
"""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
from matplotlib.ticker import MaxNLocator

from jobs.core.protocol import CommitRecord
from jobs.core.times import seconds_between

SIZE = (9.0, 3.2)  # inches; at DPI, 900 px wide: fits a laptop screen beside nothing else
DPI = 100
MAX_BINS = 60
MAX_REPLICA_LINES = 8  # more lines than this is noise: then only the total is drawn
MAX_REPLICA_LABELS = 16  # bars labelled with their rows and tokens/s up to this many replicas
COLOR = "#3b6ea8"


def _figure(panels: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def throughput(commits: list[CommitRecord], start: str) -> bytes | None:
    """Tokens/s over time (all replicas and each) and rows committed, from the commit records.

    A shard's tokens are spread evenly over the seconds it took, which ended
    at its commit: the curve shows when work happened, not when it landed."""
    timed = [c for c in commits if c.committed_at and c.seconds is not None]
    if not timed:
        return None
    ends = np.array([seconds_between(start, c.committed_at) for c in timed])
    begins = ends - np.array([max(float(c.seconds), 1e-3) for c in timed])
    tokens = np.array([c.tally.completion_tokens for c in timed], dtype=float)
    lo, hi = max(0.0, begins.min()), ends.max()
    width = max((hi - lo) / MAX_BINS, 0.5)
    edges = np.arange(lo, hi + width, width)

    def rate(which: np.ndarray) -> np.ndarray:
        per_bin = np.zeros(len(edges) - 1)
        for b, e, t in zip(begins[which], ends[which], tokens[which]):
            overlap = np.clip(np.minimum(edges[1:], e) - np.maximum(edges[:-1], b), 0, None)
            per_bin += t * overlap / (e - b)
        return per_bin / width

    fig, (left, right) = _figure(2)
    centers = (edges[:-1] + edges[1:]) / 2
    left.plot(centers, rate(np.ones(len(timed), bool)), color=COLOR, lw=2, label="all replicas")
    pids = sorted({c.replica_pid for c in timed if c.replica_pid is not None})
    if 1 < len(pids) <= MAX_REPLICA_LINES:
        for pid in pids:
            left.plot(centers, rate(np.array([c.replica_pid == pid for c in timed])), lw=1, label=f"pid {pid}")
    left.set(title="completion tokens/s", xlabel="seconds since the job started")
    left.legend(fontsize="small", frameon=False)
    order = np.argsort(ends)
    rows = np.cumsum([0] + [timed[i].tally.rows_done + timed[i].tally.rows_failed for i in order])
    right.step(np.concatenate([[lo], ends[order]]), rows, where="post", color=COLOR, lw=2)
    right.set(title="rows committed", xlabel="seconds since the job started")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def replicas(commits: list[CommitRecord], start: str) -> bytes | None:
    """Completion tokens each replica generated, and its tokens/s over the span it was busy
    (first shard's start to last shard's commit)."""
    by_pid: dict = defaultdict(lambda: {"tokens": 0, "rows": 0, "begin": np.inf, "end": -np.inf})
    for c in commits:
        if c.replica_pid is None or not c.committed_at:
            continue
        r, end = by_pid[c.replica_pid], seconds_between(start, c.committed_at)
        r["tokens"] += c.tally.completion_tokens
        r["rows"] += c.tally.rows_done
        r["begin"] = min(r["begin"], end - float(c.seconds or 0.0))
        r["end"] = max(r["end"], end)
    if not by_pid:
        return None
    fig, (ax,) = _figure()
    pids = sorted(by_pid)
    bars = ax.bar([str(p) for p in pids], [by_pid[p]["tokens"] for p in pids], color=COLOR)
    if len(pids) <= MAX_REPLICA_LABELS:
        labels = []
        for p in pids:
            r = by_pid[p]
            busy = r["end"] - r["begin"]
            labels.append(f"{r['rows']:,} rows" + (f"\n{r['tokens'] / busy:,.0f} tok/s" if busy > 0 else ""))
        ax.bar_label(bars, labels=labels, padding=2, fontsize="small")
    else:
        ax.set_xticks([])  # too many to read: the spread of the bars is what shows
    ax.set(title="completion tokens per replica", xlabel="replica (pid)")
    ax.margins(y=0.3)
    return _png(fig)


def lengths(prompt_tokens: np.ndarray, completion_tokens: np.ndarray) -> bytes | None:
    """Histograms of prompt and completion lengths in tokens, from length -> rows counts."""
    if not prompt_tokens.sum() and not completion_tokens.sum():
        return None
    fig, axes = _figure(2)
    for ax, counts, what in zip(axes, (prompt_tokens, completion_tokens), ("prompt", "completion")):
        if counts.sum():
            bin_width = max(1, int(np.ceil(len(counts) / MAX_BINS)))
            padded = np.pad(counts, (0, -len(counts) % bin_width))
            binned = padded.reshape(-1, bin_width).sum(axis=1)
            ax.bar(np.arange(len(binned)) * bin_width, binned, width=bin_width, align="edge", color=COLOR)
            mean = (np.arange(len(counts)) * counts).sum() / counts.sum()
            ax.axvline(mean, color="black", lw=1, ls="--", label=f"mean {mean:.1f}")
            ax.legend(fontsize="small", frameon=False)
        ax.set(title=f"{what} length", xlabel="tokens", ylabel="rows")
    return _png(fig)


def categories(counts: dict[str, int], title: str) -> bytes | None:
    """Horizontal bars, one per category (finish reasons, error codes, filters), largest on top."""
    if not counts:
        return None
    items = sorted(counts.items(), key=lambda kv: kv[1])
    fig, (ax,) = _figure()
    fig.set_figheight(min(1.2 + 0.35 * len(items), 6))
    bars = ax.barh([str(k) for k, _ in items], [v for _, v in items], color=COLOR)
    ax.bar_label(bars, labels=[f"{v:,}" for _, v in items], padding=3, fontsize="small")
    ax.set(title=title, xlabel="rows")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rows come whole
    ax.margins(x=0.15)
    return _png(fig)


def scores_by_sample(means: dict[int, dict[str, float]], metrics: list[str]) -> bytes | None:
    """Mean of each evaluation score per sample_index: does sampling more help?"""
    if len(means) < 2:
        return None
    fig, (ax,) = _figure()
    samples = sorted(means)
    for m in metrics:
        ax.plot(samples, [means[i].get(m, np.nan) for i in samples], marker="o", label=m)
    ax.set(title="mean score per sample_index", xlabel="sample_index")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", frameon=False)
    return _png(fig)


def mean_logprobs(edges: np.ndarray, counts: np.ndarray, mean: float) -> bytes | None:
    """Histogram of each row's mean token logprob, from rows per bin between `edges`; `mean` is
    their exact mean. The axis starts at the lowest bin with rows: most texts sit near 0."""
    if not counts.sum():
        return None
    fig, (ax,) = _figure()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=COLOR)
    ax.axvline(mean, color="black", lw=1, ls="--", label=f"mean {mean:.2f}")
    ax.legend(fontsize="small", frameon=False)
    ax.set_xlim(edges[np.nonzero(counts)[0][0]] - 0.1, edges[-1] + 0.05)
    ax.set(title="mean token logprob per row", xlabel=f"nats per token (below {edges[0]:g}: in the first bin)",
           ylabel="rows")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)
