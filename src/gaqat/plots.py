"""The paper's figures 2–5 from a GAQAT run's ``gradients.jsonl`` (docs/method.md §7).

- :func:`plot_cumulative` (Figures 2 and 5): per step size, the window sums of g_task and
  g_smooth as bars; windows where the two have opposite signs are shaded.
- :func:`plot_disorder` (Figure 3): D_task and D_smooth as layer × window heatmaps, centred
  on the freezing threshold τ when it is known, and their means over layers.
- :func:`plot_freezing` (Figure 4): which step size is frozen in which window, when each was
  frozen, and how many are frozen over training.

The data each figure shows is computed by small pure functions (:func:`window_table`,
:func:`opposite_signs`, :func:`smooth_factors`, :func:`freeze_steps`...) that tests check
without drawing. Drawing uses matplotlib's object API (``Figure`` saved through the Agg
canvas), so no pyplot state is kept and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gaqat.errors import UsageError
from gaqat.fields import check_fields
from gaqat.runfolder import GRADIENTS, RESULTS, read_jsonl

FILES = {"cumulative": "cumulative.png", "disorder": "disorder.png", "freezing": "freezing.png"}

# The fields of each kind of record.
_FIELDS = {
    "window": {
        "step": int,
        "window": int,
        "name": str,
        "g_task": float,
        "g_smooth": float,
        "d_task": float,
        "d_smooth": float,
        "frozen": bool,
    },
    "freeze": {"step": int, "name": str, "d_task": float, "d_smooth": float},
    "unfreeze": {"step": int, "name": str, "d_task": float, "d_smooth": float},
}
_SUFFIXES = {"weight_quantizer": "w", "input_quantizer": "a"}
_PREFIX = "featurizer."
TASK_COLOR, SMOOTH_COLOR, CONFLICT_COLOR = "tab:blue", "tab:orange", "#f4c7c3"


def _check_record(record: object, where: str) -> dict:
    kind = check_fields(record, {"kind": str}, where)["kind"]
    if kind not in _FIELDS:
        raise ValueError(f"{where}: field 'kind' is {kind!r}, expected one of {list(_FIELDS)}")
    return check_fields(record, _FIELDS[kind], where)


def load_gradients(path: str | Path) -> list[dict]:
    """The records of a ``gradients.jsonl``, checked; a torn last line is skipped with a warning."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected the {GRADIENTS} file of a gaqat run")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; {GRADIENTS} is written only by "
            f"`gaqat train --algorithm gaqat`, at the end of its first window: is "
            f"{path.parent} a gaqat run that has trained for at least one window?"
        )
    records = []
    for where, record in read_jsonl(path):
        records.append(_check_record(record, where))
    return records


def run_tau(run_dir: str | Path) -> float | None:
    """τ from the first record of the run's ``results.jsonl`` (None when not recorded)."""
    path = Path(run_dir) / RESULTS
    records = read_jsonl(path) if path.is_file() else []
    if not records:  # no record yet, or a torn first one (killed before its first checkpoint)
        return None
    where, first = records[0]
    check_fields(first, {"hparams": dict, "hparams.tau": float}, where, required=False)
    tau = first.get("hparams", {}).get("tau")
    if tau is not None and not 0 <= tau <= 1:  # NaN too
        raise ValueError(f"{where}: field 'hparams.tau' is {tau!r}, expected a number from 0 to 1")
    return None if tau is None else float(tau)


def short_label(name: str) -> str:
    """``featurizer.3.weight_quantizer`` -> ``3.w`` (w: weight, a: input activation)."""
    base, _, last = name.rpartition(".")
    if last in _SUFFIXES and base:
        name = f"{base}.{_SUFFIXES[last]}"
    return name.removeprefix(_PREFIX)


def short_labels(names: Sequence[str]) -> list[str]:
    """Short labels for all names, or the full names where shortening would merge two."""
    labels = [short_label(n) for n in names]
    return labels if len(set(labels)) == len(labels) else list(names)


@dataclass(frozen=True)
class WindowTable:
    """The window records as [layer, window] arrays (NaN where a record is missing).

    Layers are in model order (first appearance in the file); windows ascending.
    ``frozen`` is the state during the window (decisions at its end apply to the next).
    """

    names: tuple[str, ...]
    windows: np.ndarray  # [W] window numbers
    steps: np.ndarray  # [W] the last step of each window
    g_task: np.ndarray
    g_smooth: np.ndarray
    d_task: np.ndarray
    d_smooth: np.ndarray
    frozen: np.ndarray  # bool; False where missing
    decisions: tuple[dict, ...]  # freeze / unfreeze records in file order

    @property
    def labels(self) -> list[str]:
        return short_labels(self.names)

    @property
    def edges(self) -> np.ndarray:
        """[W + 1] step boundaries: window w spans (edges[w], edges[w + 1]]."""
        length = self.steps[0] / self.windows[0]
        return np.concatenate([[self.steps[0] - length], self.steps]).astype(float)


def window_table(records: Sequence[dict]) -> WindowTable:
    """Arrange the window records by layer and window; duplicates are an error."""
    rows = [r for r in records if r["kind"] == "window"]
    if not rows:
        raise ValueError("no window records: the run stopped before its first window ended")
    names = tuple(dict.fromkeys(r["name"] for r in rows))
    windows = np.array(sorted({r["window"] for r in rows}))
    steps = {}
    for r in rows:
        if steps.setdefault(r["window"], r["step"]) != r["step"]:
            raise ValueError(
                f"window {r['window']} ends at step {steps[r['window']]} and at "
                f"step {r['step']}: is the file two runs appended?"
            )
    layer = {n: i for i, n in enumerate(names)}
    col = {w: j for j, w in enumerate(windows)}
    shape = (len(names), len(windows))
    arrays = {k: np.full(shape, np.nan) for k in ("g_task", "g_smooth", "d_task", "d_smooth")}
    frozen = np.zeros(shape, dtype=bool)
    seen = np.zeros(shape, dtype=bool)
    for r in rows:
        i, j = layer[r["name"]], col[r["window"]]
        if seen[i, j]:
            raise ValueError(
                f"two records for {r['name']} in window {r['window']}: "
                f"is the file two runs appended?"
            )
        seen[i, j] = True
        for key, array in arrays.items():
            array[i, j] = r[key]
        frozen[i, j] = r["frozen"]
    return WindowTable(
        names=names,
        windows=windows,
        steps=np.array([steps[w] for w in windows]),
        frozen=frozen,
        decisions=tuple(r for r in records if r["kind"] != "window"),
        **arrays,
    )


def opposite_signs(table: WindowTable) -> np.ndarray:
    """[L, W] bool: the window sums of g_task and g_smooth point in opposite directions."""
    with np.errstate(invalid="ignore"):
        return np.sign(table.g_task) * np.sign(table.g_smooth) < 0


def smooth_factors(table: WindowTable) -> np.ndarray:
    """[L] powers of ten that bring each layer's g_smooth bars to the size of its g_task bars.

    g_smooth is often an order of magnitude smaller than g_task; drawn unscaled, its bars
    and their signs would be invisible.
    """
    task = np.nanmax(np.abs(table.g_task), axis=1)
    smooth = np.nanmax(np.abs(table.g_smooth), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.round(np.log10(task / smooth))
    return np.where(np.isfinite(exponent), 10.0**exponent, 1.0)


def freeze_steps(table: WindowTable) -> dict[str, int]:
    """The step of each step size's first freeze decision (the frozen ones only)."""
    first: dict[str, int] = {}
    for d in table.decisions:
        if d["kind"] == "freeze":
            first.setdefault(d["name"], d["step"])
    return first


def frozen_counts(table: WindowTable) -> np.ndarray:
    """[W + 1] how many step sizes are frozen after each boundary in ``table.edges``.

    Starts at 0 and replays the decisions, so a decision at the end of the last window counts.
    """
    frozen: set[str] = set()
    counts = [0]
    by_step: dict[int, list[dict]] = {}
    for d in table.decisions:
        by_step.setdefault(d["step"], []).append(d)
    for step in table.steps:
        for d in by_step.get(int(step), []):
            (frozen.add if d["kind"] == "freeze" else frozen.discard)(d["name"])
        counts.append(len(frozen))
    return np.array(counts)


def below_tau_fraction(table: WindowTable, tau: float) -> float:
    """Share of (layer, window) D_task values below τ, the first (warm-up) window left out."""
    values = table.d_task[:, 1:]
    values = values[~np.isnan(values)]
    return float(np.mean(values < tau)) if values.size else math.nan


def _label_note(table: WindowTable) -> str:
    if table.labels == list(table.names):
        return ""
    return f"labels: '{_PREFIX}' dropped, w = weight step size, a = input (activation) step size"


def _layer_axis(ax, table: WindowTable) -> None:
    """Rows = layers, first layer at the top; x = training step."""
    ax.set_yticks(np.arange(len(table.names)), table.labels, fontsize=8)
    ax.set_ylim(len(table.names) - 0.5, -0.5)
    ax.set_xlim(table.edges[0], table.edges[-1])
    ax.set_xlabel("step")


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_cumulative(records: Sequence[dict], out: str | Path) -> Path:
    """Figure 2/5: per step size, window sums of g_task and g_smooth; opposite signs shaded."""
    table = window_table(records)
    conflict = opposite_signs(table)
    factors = smooth_factors(table)
    frozen_at = freeze_steps(table)
    n = len(table.names)
    cols = min(n, max(3, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 2.3 * rows + 1.1), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    edges = table.edges
    width = np.diff(edges)
    centers = edges[:-1] + width / 2
    for i, (ax, label) in enumerate(zip(axes, table.labels)):
        for lo, hi in zip(edges[:-1][conflict[i]], edges[1:][conflict[i]]):
            ax.axvspan(lo, hi, color=CONFLICT_COLOR, lw=0)
        ax.bar(centers - width / 5, table.g_task[i], width * 0.38, color=TASK_COLOR)
        ax.bar(
            centers + width / 5, table.g_smooth[i] * factors[i], width * 0.38, color=SMOOTH_COLOR
        )
        ax.axhline(0, color="black", lw=0.6)
        if table.names[i] in frozen_at:
            ax.axvline(frozen_at[table.names[i]], color="black", ls="--", lw=0.8)
        scale = "" if factors[i] == 1 else f", smooth×{factors[i]:g}"
        ax.set_title(f"{label}: {conflict[i].sum()}/{conflict.shape[1]} opp.{scale}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.yaxis.get_offset_text().set_fontsize(7)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[max(0, n - cols) : n]:
        ax.set_xlabel("step", fontsize=8)
    valid = ~np.isnan(table.g_task) & ~np.isnan(table.g_smooth)
    share = conflict.sum() / max(valid.sum(), 1)
    fig.legend(
        handles=[
            Patch(color=TASK_COLOR, label="g_task (window sum)"),
            Patch(color=SMOOTH_COLOR, label="g_smooth (window sum, × the panel's factor)"),
            Patch(color=CONFLICT_COLOR, label="opposite signs"),
            Line2D([], [], color="black", ls="--", lw=0.8, label="frozen from this step"),
        ],
        loc="outside lower center",
        ncols=4,
        fontsize=8,
    )
    note = _label_note(table)
    fig.suptitle(
        "Cumulative step-size gradients per window: task vs smoothness — opposite "
        f"signs in {conflict.sum()}/{valid.sum()} ({share:.0%}) layer-windows"
        + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    return _save(fig, out)


def _disorder_norm(tau: float | None) -> Normalize:
    """Centred on τ (below it: freeze candidates) when τ is a usable threshold."""
    if tau is not None and 0 < tau < 1:
        return TwoSlopeNorm(vcenter=tau, vmin=0, vmax=1)
    return Normalize(0, 1)


def plot_disorder(records: Sequence[dict], out: str | Path, tau: float | None = None) -> Path:
    """Figure 3: D_task and D_smooth per layer and window, and their means over layers."""
    table = window_table(records)
    n = len(table.names)
    fig = Figure(figsize=(12, 0.28 * n + 4.2), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[max(n * 0.28, 1.6), 2.0])
    rows = np.arange(n + 1) - 0.5
    norm = _disorder_norm(tau)
    cmap = "RdYlBu" if isinstance(norm, TwoSlopeNorm) else "viridis"
    for k, (key, title) in enumerate((("d_task", "D_task"), ("d_smooth", "D_smooth"))):
        ax = fig.add_subplot(grid[0, k])
        mesh = ax.pcolormesh(
            table.edges, rows, np.ma.masked_invalid(getattr(table, key)), cmap=cmap, norm=norm
        )
        _layer_axis(ax, table)
        ax.set_title(f"{title} per layer and window", fontsize=10)
        bar = fig.colorbar(mesh, ax=ax, pad=0.01)
        if tau is not None:
            bar.ax.axhline(tau, color="black", lw=1.2)
            bar.ax.text(1.6, tau, " τ", va="center", transform=bar.ax.get_yaxis_transform())
    ax = fig.add_subplot(grid[1, :])
    x = table.steps
    for key, color, label in (
        ("d_task", TASK_COLOR, "D_task"),
        ("d_smooth", SMOOTH_COLOR, "D_smooth"),
    ):
        values = getattr(table, key)
        ax.fill_between(
            x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color, alpha=0.15, lw=0
        )
        ax.plot(
            x,
            np.nanmean(values, axis=0),
            "o-",
            color=color,
            ms=3,
            label=f"{label}: mean over layers (band: min–max)",
        )
    if tau is not None:
        ax.axhline(tau, color="black", ls="--", lw=0.9, label=f"τ = {tau:g}")
    ax.set_xlim(table.edges[0], table.edges[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("step (end of window)")
    ax.set_ylabel("disorder")
    ax.legend(fontsize=8, loc="upper right", ncols=3)
    title = (
        f"Gradient disorder of the step sizes (window of {int(np.diff(table.edges)[0])} "
        f"steps): mean D_task {np.nanmean(table.d_task):.2f}, "
        f"D_smooth {np.nanmean(table.d_smooth):.2f}"
    )
    if tau is not None:
        title += (
            f"; D_task < τ = {tau:g} in {below_tau_fraction(table, tau):.0%} of "
            "layer-windows after the first"
        )
    note = _label_note(table)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    return _save(fig, out)


def plot_freezing(records: Sequence[dict], out: str | Path, tau: float | None = None) -> Path:
    """Figure 4: frozen step sizes per window, freeze/unfreeze decisions, counts over steps."""
    table = window_table(records)
    n = len(table.names)
    counts = frozen_counts(table)
    frozen_at = freeze_steps(table)
    fig = Figure(figsize=(10, 0.3 * n + 3.4), layout="constrained")
    top, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1.0, max(n * 0.3, 1.4)])
    top.step(table.edges, counts, where="post", color="black")
    top.set_ylim(-0.3, n + 0.3)
    top.set_ylabel("# frozen", fontsize=9)
    top.grid(alpha=0.3)
    state = np.where(np.isnan(table.d_task), np.nan, table.frozen.astype(float))
    ax.pcolormesh(
        table.edges,
        np.arange(n + 1) - 0.5,
        np.ma.masked_invalid(state),
        cmap="Greys",
        vmin=-0.25,
        vmax=1.6,
        edgecolors="white",
        linewidth=0.5,
    )
    layer = {name: i for i, name in enumerate(table.names)}
    for kind, marker, color in (("freeze", ">", "tab:red"), ("unfreeze", "<", "tab:green")):
        hits = [d for d in table.decisions if d["kind"] == kind and d["name"] in layer]
        if hits:
            ax.scatter(
                [d["step"] for d in hits],
                [layer[d["name"]] for d in hits],
                marker=marker,
                color=color,
                s=40,
                zorder=3,
                label=f"{kind} decision",
            )
    _layer_axis(ax, table)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(
        np.arange(n),
        [f"@{frozen_at[name]}" if name in frozen_at else "–" for name in table.names],
        fontsize=8,
    )
    if table.decisions:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    threshold = f" (D_task < τ = {tau:g})" if tau is not None else ""
    note = _label_note(table)
    fig.suptitle(
        f"Frozen step sizes{threshold}: {counts[-1]} of {n} frozen by step "
        f"{int(table.steps[-1])}; dark = frozen during the window, right: first freeze "
        f"step" + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    return _save(fig, out)


def plot_run(
    run_dir: str | Path, out: str | Path | None = None, tau: float | None = None
) -> list[Path]:
    """The three figures of a gaqat run folder, into ``out`` (default: the run folder).

    ``tau`` defaults to the run's own (``results.jsonl``, first record's ``hparams.tau``).
    """
    run_dir = Path(run_dir)
    if tau is not None and not (math.isfinite(tau) and 0.0 <= tau <= 1.0):
        raise UsageError(f"--tau: expected a freezing threshold in [0, 1], got {tau}")
    if run_dir.is_file():
        raise FileNotFoundError(f"{run_dir} is a file; give the run folder: {run_dir.parent}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    records = load_gradients(run_dir / GRADIENTS)
    tau = run_tau(run_dir) if tau is None else tau
    out = run_dir if out is None else Path(out)
    return [
        plot_cumulative(records, out / FILES["cumulative"]),
        plot_disorder(records, out / FILES["disorder"], tau),
        plot_freezing(records, out / FILES["freezing"], tau),
    ]
