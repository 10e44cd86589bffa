"""A timeline picture of a TaxReport: the bulk-synchronous schedule against the overlapped one.

Top: the BSP schedule as modelled, one row per stream (compute, communication); each kernel is a
launch gap then its work then its HBM round trip (the data-locality tax), and each wait is the idle time
of the faster ranks (the bulk-synchronous tax). Bottom: the same work with every tax removed and
compute overlapping communication: its length is the overlap bound.

Example::

    plot_timeline(analyze(program), "sp_mlp.png")
"""
from __future__ import annotations

from dataclasses import dataclass

from bspfuse.analysis import TaxReport

COLORS = {
    "compute": "#4C72B0",
    "comm": "#DD8452",
    "launch": "#B0B0B0",
    "sync": "#C44E52",
    "locality": "#8172B3",
}
LABELS = {
    "compute": "compute",
    "comm": "communication",
    "launch": "launch gap (launch tax)",
    "sync": "waiting for the slowest rank (bulk-synchronous tax)",
    "locality": "HBM round trip between kernels (data-locality tax)",
}


@dataclass(frozen=True)
class Bar:
    row: str  # "compute" or "comm" stream
    start: float
    length: float
    what: str  # a COLORS key
    label: str  # the op's values, for the biggest bars


def bsp_schedule(report: TaxReport) -> list[Bar]:
    """The modelled BSP schedule: every op and tax one after the other, each on its stream."""
    bars, t = [], 0.0
    for r in report.rows:
        stream = "comm" if r.kind == "comm" else "compute"
        if r.launch_tax_us:
            bars.append(Bar(stream, t, r.launch_tax_us, "launch", ""))
            t += r.launch_tax_us
        if r.kind == "fused":
            bars.append(Bar("compute", t, r.compute_us, "compute", r.values))
            bars.append(Bar("comm", t, r.comm_us, "comm", r.values))
            t += r.op_time_us
        elif r.op_time_us:
            bars.append(Bar(stream, t, r.op_time_us, "comm" if r.kind == "comm" else "compute", r.values))
            t += r.op_time_us
        if r.data_locality_tax_us:
            bars.append(Bar(stream, t, r.data_locality_tax_us, "locality", ""))
            t += r.data_locality_tax_us
        if r.bulk_synchronous_tax_us:
            bars.append(Bar("compute", t, r.bulk_synchronous_tax_us, "sync", ""))
            t += r.bulk_synchronous_tax_us
    return bars


def overlapped_schedule(report: TaxReport) -> list[Bar]:
    """The same work with no taxes, compute and communication each back to back on their own stream."""
    bars, clock = [], {"compute": 0.0, "comm": 0.0}
    for r in report.rows:
        for stream, length in (("compute", r.compute_us), ("comm", r.comm_us)):
            if length:
                bars.append(Bar(stream, clock[stream], length, stream, r.values))
                clock[stream] += length
    return bars


def plot_timeline(report: TaxReport, path: str) -> str:
    """Write the timeline PNG to `path` and return `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    totals = report.totals()
    fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    panels = [(axes[0], bsp_schedule(report), f"bulk-synchronous, as modelled: {totals['bsp_time_us']:.0f} us"),
              (axes[1], overlapped_schedule(report),
               f"overlapped, no taxes (the bound): {totals['overlap_bound_us']:.0f} us")]
    end = max(totals["bsp_time_us"], totals["overlap_bound_us"], 1e-9)
    used = set()
    for ax, bars, title in panels:
        rows = {"compute": 1, "comm": 0}
        for b in bars:
            ax.broken_barh([(b.start, b.length)], (rows[b.row] - 0.4, 0.8), facecolors=COLORS[b.what],
                           edgecolor="white", linewidth=0.3)
            used.add(b.what)
            if b.label and b.length > 0.06 * end:
                ax.text(b.start + b.length / 2, rows[b.row], b.label, ha="center", va="center", fontsize=7,
                        color="white", clip_on=True)
        ax.set_yticks([0, 1], ["communication", "compute"])
        ax.set_ylim(-0.6, 1.6)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_xlabel("time (us)")
    axes[1].set_xlim(0, end * 1.02)
    fig.suptitle(f"{report.program} on {report.device.name}, world size {report.world_size}: "
                 f"launch tax {totals['launch_tax_us']:.0f} us, bulk-synchronous tax "
                 f"{totals['bulk_synchronous_tax_us']:.0f} us, "
                 f"data-locality tax {totals['data_locality_tax_us']:.0f} us",
                 fontsize=11)
    handles = [Patch(facecolor=COLORS[k], label=LABELS[k]) for k in COLORS if k in used]
    fig.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
