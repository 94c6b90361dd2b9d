"""The DigitsDG study: GAQAT against LSQ+SAGM with enough pairs to decide, ablations, figures.

    python benchmarks/digits_study.py run OUT [--quick] [--jobs 2 --threads 1] [--parts ...]
    python benchmarks/digits_study.py page OUT [--quick]
    python benchmarks/digits_study.py pairs OUT [--quick]
    python benchmarks/digits_study.py archive OUT [--quick]

``run`` trains every run into OUT (idempotent: a stopped study resumes when launched
again). ``page`` writes ``docs/results/digits.md`` (``benchmarks/templates/digits.md``
filled in) and its figures from OUT, and the JSON summary
``benchmarks/results/digits_study.json`` (with ``--quick``: both into OUT/page).
``pairs`` prints the page's paired comparisons (ensembles included) over the runs
finished so far and writes them to ``benchmarks/results/digits_study_pairs.json`` (with
``--quick``: into OUT): the evidence of a study still training, or trained only in part.
``archive`` writes the finished runs' records, without checkpoints, to
``benchmarks/results/digits_study_records.tar.xz`` (``study_records``: how a study
continues from it).

- ``OUT/main``: float ``erm`` on every held-out domain and trial seeds 0-2, and from each
  of those the QAT methods ``lsq``, ``lsq_sagm`` and ``gaqat`` at 4 and 3 bits, with the
  same init, seed and batches, so methods compare in pairs.
- ``OUT/ablations/<variant>``: ``gaqat`` (and ``lsq_sagm`` where the variant changes it
  too) at 3 bits on two held-out domains, three seeds; the float runs and unchanged
  ``lsq_sagm`` runs are linked from ``OUT/main``, not trained again.
- ``OUT/extra``: float ``sagm`` on the first seed (a thousand SAGM steps a run), and QAT
  ``lsq_sam`` (LSQ with SAM, as cheap as a main-grid run) on every seed.
- ``OUT/best``: the candidates for the best low-bit model on the main grid's draws: float
  ``swad`` (SWAD's direction against ``erm``), ``lsq_sam_swad`` and ``qtdog`` (each against
  ``lsq_sam`` and ``lsq_sagm``), evaluated every :data:`BEST_CHECKPOINT_FREQ` steps so
  that SWAD's window rule sees a validation-loss curve.
- ``OUT/ensembles``: EoQ's ensembles (``gaqat ensemble``) of the trial seeds' runs of each
  of :data:`ENSEMBLE_METHODS`, one per bit width and held-out domain, each against the
  mean of its own members; nothing is trained.

``--quick`` runs the same pipeline in minutes on tiny runs: it checks the machinery, its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from study_ensembles import (
    EnsembleJob,
    build_ensembles,
    ensemble_gains,
    ensemble_jobs,
    size_lines,
)
from study_page import (
    ROOT,
    all_domains,
    commit,
    comparison_table,
    diff_text,
    paired,
    pooled,
    render,
    verdict,
)
from study_records import archive_records

from gaqat.hparams import default_hparams
from gaqat.launchers import InlineLauncher, ProcessLauncher, sigterm_as_interrupt
from gaqat.names import get_recipe
from gaqat.plots import plot_run
from gaqat.report import report
from gaqat.runfolder import DONE, GRADIENTS, RESULTS, read_jsonl
from gaqat.sweep import SweepConfig, launch, plan

DOMAINS = ("mnist", "mnist_m", "syn", "optdigits")


@dataclass(frozen=True)
class Scale:
    """How long the study's runs are (sized from measured step times: see the page)."""

    steps: int
    checkpoint_freq: int
    float_steps: int
    float_checkpoint_freq: int
    seeds: tuple[int, ...]
    test_envs: tuple[int, ...]
    bits: tuple[int, ...]
    ablation_envs: tuple[int, ...]
    hparams: dict = field(default_factory=dict)
    variants: tuple[str, ...] | None = None  # None: every variant


FULL = Scale(
    steps=300,
    checkpoint_freq=100,
    float_steps=1000,
    float_checkpoint_freq=100,
    seeds=(0, 1, 2),
    test_envs=(0, 1, 2, 3),
    bits=(4, 3),
    ablation_envs=(1, 2),
)
QUICK = Scale(
    steps=20,
    checkpoint_freq=10,
    float_steps=30,
    float_checkpoint_freq=10,
    seeds=(0, 1),
    test_envs=(1,),
    bits=(3,),
    ablation_envs=(1,),
    hparams={"window": 5},
    variants=("tau0.1", "per_channel"),
)

MAIN_METHODS = ("erm", "lsq", "lsq_sagm", "gaqat")
EXTRA_METHODS = ("sagm", "lsq_sam")
BEST_METHODS = ("swad", "lsq_sam_swad", "qtdog")
ENSEMBLE_METHODS = ("lsq", "lsq_sam", "lsq_sagm", "gaqat")  # EoQ's ensembles of their seeds
BEST_CHECKPOINT_FREQ = 25
# Each ablation: the overrides of GAQAT's defaults it tests. Where an override is also a
# lsq_sagm hyperparameter (step sizes' learning rate, per-channel scales), lsq_sagm runs
# with it too, so every pair still differs by freezing alone.
VARIANTS = {  # in the order they run: the likeliest to move the outcome first
    "freeze_all": {"freeze_mode": "all"},
    "tau0.4": {"tau": 0.4},
    "lr_scale10": {"step_size_lr_scale": 10.0},
    "per_channel": {"per_channel": True},
    "tau0.1": {"tau": 0.1},
    "unfreeze": {"unfreeze": True},
    "cancellation": {"disorder_metric": "cancellation"},
    "window25": {"window": 25},
    "window100": {"window": 100},
    "lr_scale0.1": {"step_size_lr_scale": 0.1},
    "tau0.2": {"tau": 0.2},
}


# --- training ------------------------------------------------------------------------------


def _sweep(
    out: Path,
    scale: Scale,
    algorithms,
    *,
    test_envs=None,
    bits=None,
    seeds=None,
    hparams=None,
    data_dir=None,
    checkpoint_freq=None,
    float_checkpoint_freq=None,
) -> SweepConfig:
    return SweepConfig(
        "digits",
        out,
        algorithms,
        test_envs=test_envs or scale.test_envs,
        bits=bits or scale.bits,
        seeds=seeds or scale.seeds,
        options={
            "steps": scale.steps,
            "checkpoint_freq": checkpoint_freq or scale.checkpoint_freq,
            "hparams": {**_known(scale.hparams, algorithms), **(hparams or {})},
            "data_dir": data_dir,
            "progress": False,
        },
        float_options={
            "steps": scale.float_steps,
            "checkpoint_freq": float_checkpoint_freq or scale.float_checkpoint_freq,
        },
    )


def _known(hparams: dict, algorithms) -> dict:
    """The overrides some of these algorithms have (the quick window is gaqat's alone)."""
    known = set().union(*(default_hparams(a, "digits") for a in algorithms))
    return {k: v for k, v in hparams.items() if k in known}


def link_shared(jobs, main: Path) -> None:
    """Link the runs a sweep shares with the main grid (same arguments, so the same folder
    name) instead of training them again."""
    for job in jobs:
        source = main / job.folder.name
        if source.is_dir() and not job.folder.exists():
            job.folder.parent.mkdir(parents=True, exist_ok=True)
            job.folder.symlink_to(os.path.relpath(source, job.folder.parent))


PARTS = ("main", "ablations", "extra", "best", "ensembles")


def run_study(
    out: Path, scale: Scale, jobs: int, threads: int | None, data_dir, parts=PARTS
) -> None:
    """Train the study's ``parts`` in order; the ablations and extras link the float and
    unchanged runs the main grid already has (or train them where it has not run). The
    ensembles part trains nothing: it evaluates the finished runs' ensembles."""
    main = out / "main"
    sweeps = []
    if "main" in parts:
        sweeps.append(_sweep(main, scale, MAIN_METHODS, data_dir=data_dir))
    for name in (scale.variants or VARIANTS) if "ablations" in parts else ():
        sweeps.append(
            _sweep(
                out / "ablations" / name,
                scale,
                ("lsq_sagm", "gaqat"),
                test_envs=scale.ablation_envs,
                bits=(3,),
                hparams=VARIANTS[name],
                data_dir=data_dir,
            )
        )
    if "extra" in parts:
        extra = out / "extra"
        sweeps.append(_sweep(extra, scale, ("sagm",), seeds=scale.seeds[:1], data_dir=data_dir))
        sweeps.append(_sweep(extra, scale, ("lsq_sam",), data_dir=data_dir))
    if "best" in parts:  # float swad apart: its evaluations, unlike its inits', are often
        often = min(BEST_CHECKPOINT_FREQ, scale.checkpoint_freq)
        qat = [m for m in BEST_METHODS if m != "swad"]
        sweeps.append(_sweep(out / "best", scale, qat, data_dir=data_dir, checkpoint_freq=often))
        sweeps.append(
            _sweep(out / "best", scale, ("swad",), data_dir=data_dir, float_checkpoint_freq=often)
        )
    for config in sweeps:
        planned = plan(config)
        if config.output != main:
            link_shared(planned, main)
        print(f"== {config.output}: {len(planned)} runs", flush=True)
        launcher = ProcessLauncher(jobs, threads) if jobs > 1 else InlineLauncher(threads)
        outcomes = launch(planned, launcher=launcher, note=lambda line: print(line, flush=True))
        failed = [o for o in outcomes if o.status not in ("kept", "ran")]
        if failed or len(outcomes) < len(planned):
            raise SystemExit(
                f"{config.output}: {len(failed)} runs failed or were skipped; "
                f"launch the study again to retry them"
            )
    if "ensembles" in parts:
        build_ensembles(ensembles_of(out, scale), data_dir)


def ensembles_of(out: Path, scale: Scale) -> list[EnsembleJob]:
    """The ensembles of :data:`ENSEMBLE_METHODS`' runs (``lsq_sam``'s are the extras'),
    over the trial seeds, one per bit width and held-out domain, in ``OUT/ensembles``."""
    runs = {
        (m, b): runs_of(out / ("extra" if m in EXTRA_METHODS else "main"), m, b)
        for m in ENSEMBLE_METHODS
        for b in scale.bits
    }
    return ensemble_jobs(runs, out / "ensembles", scale.test_envs, scale.seeds)


# --- reading the study ---------------------------------------------------------------------


def _number(row: dict, key: str) -> float | None:
    return float(row[key]) if row.get(key) else None


def runs_of(folder: Path, algorithm: str, bits: int | None = None) -> list[Path]:
    """Run folders (links followed) of one method and bit width below ``folder`` that
    have written records: a run that a study is just starting has none to read yet."""
    prefix = f"{algorithm}_w{bits}_" if bits else f"{algorithm}_env"
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.name.startswith(prefix) and (p / RESULTS).is_file()
    )


def records(folder: Path, name: str = RESULTS) -> list[dict]:
    """A run's records of one file; none before the file exists (a gaqat run writes
    ``gradients.jsonl`` at its first window's end)."""
    path = folder / name
    return [record for _, record in read_jsonl(path)] if path.exists() else []


def freezing_stats(folders: list[Path], tau: float) -> dict:
    """What freezing did over a set of gaqat runs (window records after the warm-up)."""
    windows, freezes, sizes, conflicts = [], [], 0, []
    for folder in folders:
        recs = records(folder, GRADIENTS)
        mine = [r for r in recs if r["kind"] == "window"]
        sizes += len({r["name"] for r in mine})
        windows += [r for r in mine if r["window"] > 1]
        conflicts += [r["g_task"] * r["g_smooth"] < 0 for r in mine]
        freezes += [r for r in recs if r["kind"] == "freeze"]
    d_task = np.array([r["d_task"] for r in windows])
    layers = defaultdict(int)
    for r in freezes:
        layers[r["name"]] += 1
    return {
        "runs": len(folders),
        "step_sizes": sizes,
        "frozen": len(freezes),
        "freeze_steps": sorted(r["step"] for r in freezes),
        "frozen_by_layer": dict(sorted(layers.items())),
        "d_task": d_task.tolist(),
        "d_task_mean": float(d_task.mean()) if len(d_task) else None,
        "below_tau": float((d_task < tau).mean()) if len(d_task) else None,
        "conflict_share": float(np.mean(conflicts)) if conflicts else None,
    }


def step_times(main: Path, bits: tuple[int, ...]) -> dict[str, float]:
    """Median over runs of each run's mean training-step time, per method and bit width."""
    times = {"erm": [np.mean([r["step_time"] for r in records(f)]) for f in runs_of(main, "erm")]}
    for algorithm in MAIN_METHODS[1:]:
        for b in bits:
            times[f"{algorithm}_w{b}"] = [
                np.mean([r["step_time"] for r in records(f)]) for f in runs_of(main, algorithm, b)
            ]
    return {k: float(np.median(v)) for k, v in times.items() if v}


# --- figures -------------------------------------------------------------------------------


def erm_curves(main: Path) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per held-out domain: the float runs' checkpoints and their training-domain validation
    accuracy (%), one row per seed."""
    out = {}
    for env, domain in enumerate(DOMAINS):
        curves = []
        for folder in runs_of(main, "erm"):
            recs = records(folder)
            if recs[0]["args"]["test_envs"] != [env]:
                continue
            train = [i for i in range(len(DOMAINS)) if i != env]
            curves.append(
                [(r["step"], 100 * np.mean([r[f"env{i}_out_acc"] for i in train])) for r in recs]
            )
        if curves:
            out[domain] = ([s for s, _ in curves[0]], np.array([[v for _, v in c] for c in curves]))
    return out


def plateau_text(curves) -> str:
    """How much the float runs still gained over their last fifth of training."""
    gains = []
    for steps, values in curves.values():
        mean, fifth = values.mean(0), max(1, len(steps) // 5)
        if len(steps) > fifth:
            gains.append(mean[-1] - mean[-1 - fifth])
    if not gains:
        return "one checkpoint each, so no curve"
    return (
        f"over the last fifth of their steps, the seed-mean training-domain validation "
        f"accuracy moved by {min(gains):+.1f} to {max(gains):+.1f} points across held-out "
        f"domains"
    )


def figure_erm_curve(curves, path: Path) -> None:
    """Training-domain validation accuracy of the float runs over their steps."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for domain, (steps, values) in curves.items():
        ax.plot(steps, values.mean(0), marker="o", label=f"{domain} held out")
    ax.set_xlabel("step")
    ax.set_ylabel("training-domain validation accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def figure_paired(rows_by_panel: dict[str, list[dict]], path: Path) -> None:
    """Paired differences per held-out domain and bit width, mean ± standard error."""
    fig = Figure(figsize=(4.2 * len(rows_by_panel), 3.6))
    for k, (title, rows) in enumerate(rows_by_panel.items()):
        ax = fig.add_subplot(1, len(rows_by_panel), k + 1)
        columns = list(dict.fromkeys(r["domain"] for r in rows))
        widths = sorted({r["bits"] for r in rows}, reverse=True)
        for j, bits in enumerate(widths):
            mine = {r["domain"]: r for r in rows if r["bits"] == bits}
            xs = np.arange(len(columns)) + (j - (len(widths) - 1) / 2) * 0.35
            means = [_number(mine.get(c, {}), "mean_diff") or 0 for c in columns]
            errors = [_number(mine.get(c, {}), "stderr") or 0 for c in columns]
            ax.bar(xs, means, 0.35, yerr=errors, capsize=3, label=f"{bits} bits")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(columns)), columns, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("points")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def figure_d_task(stats_by_bits: dict[int, dict], tau: float, path: Path) -> None:
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 21)
    for bits, stats in stats_by_bits.items():
        ax.hist(stats["d_task"], bins=bins, alpha=0.6, label=f"{bits} bits", density=True)
    ax.axvline(tau, color="black", ls="--", label=f"τ = {tau}")
    ax.set_xlabel("D_task of a step size over a window (after the warm-up window)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def figure_freeze_timeline(main: Path, widths: tuple[int, ...], path: Path) -> None:
    """Per bit width: the share of gaqat runs (domains × seeds) in which each step size was
    frozen during each window."""
    fig = Figure(figsize=(5 * len(widths), 3))
    for k, bits in enumerate(widths):
        frozen: dict[tuple[str, int], list[bool]] = defaultdict(list)
        for folder in runs_of(main, "gaqat", bits):
            for r in records(folder, GRADIENTS):
                if r["kind"] == "window":
                    frozen[r["name"], r["window"]].append(r["frozen"])
        names = sorted({n for n, _ in frozen})
        windows = sorted({w for _, w in frozen})
        grid = np.array([[np.mean(frozen[n, w]) for w in windows] for n in names])
        ax = fig.add_subplot(1, len(widths), k + 1)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_yticks(range(len(names)), [n.replace("featurizer.", "") for n in names], fontsize=7)
        ax.set_xticks(range(len(windows)), windows)
        ax.set_xlabel("window")
        ax.set_title(f"{bits} bits: share of runs frozen", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def figure_ablations(rows: list[tuple[str, dict]], path: Path) -> None:
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    names = [name for name, _ in rows]
    ax.bar(
        range(len(rows)),
        [_number(r, "mean_diff") or 0 for _, r in rows],
        yerr=[_number(r, "stderr") or 0 for _, r in rows],
        capsize=3,
    )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), names, rotation=35, fontsize=8)
    ax.set_ylabel("gaqat − lsq_sagm (points)")
    ax.set_title("3 bits, paired, training-domain validation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- the page ------------------------------------------------------------------------------


# What the extras answer: SAGM's effect without quantization, and whether SAGM's gain in
# QAT is more than plain SAM's. What the best part answers: whether weight averaging or
# QT-DoG's recipe beats lsq_sam and lsq_sagm, the best of the others.
EXTRA_COMPARISONS = (("sagm", "erm"), ("lsq_sam", "lsq"), ("lsq_sam", "lsq_sagm"))
BEST_COMPARISONS = (
    ("swad", "erm"),
    ("lsq_sam_swad", "lsq_sam"),
    ("lsq_sam_swad", "lsq_sagm"),
    ("qtdog", "lsq_sam"),
    ("qtdog", "lsq_sagm"),
)


def extra_comparisons(out: Path, part: str = "extra") -> dict[str, dict]:
    """Each comparison of a part (``extra``: ``EXTRA_COMPARISONS``, ``best``:
    ``BEST_COMPARISONS``) pooled over the bit widths, on every pair there is (the main
    grid's and the extras' runs are the baselines); {} until all of the part's runs finish."""
    methods, comparisons = {
        "extra": (EXTRA_METHODS, EXTRA_COMPARISONS),
        "best": (BEST_METHODS, BEST_COMPARISONS),
    }[part]
    runs = [f for m in methods for f in (out / part).glob(f"{m}_*")]
    if not runs or not all((f / DONE).exists() for f in runs):
        return {}
    folders = [out / "main", out / "extra", out / "best"]
    return {f"{a} − {b}": pooled(folders, a, b) for a, b in comparisons}


def extras_text(out: Path, scale: Scale, extras: dict[str, dict]) -> list[str]:
    """The page's lines on float ``sagm`` and ``lsq_sam``: their paired differences, or
    that they have not run."""
    if not extras:
        return [
            "Float `sagm` and `lsq_sam` (LSQ with SAM), planned on one trial seed "
            f"(`{out.name}/extra`), did not run in this study; `run` again trains them.",
        ]
    return [
        f"Float `sagm` ran on trial seed {scale.seeds[0]} only, so its row has one trial; "
        f"`lsq_sam` (LSQ with SAM) on every seed (`{out.name}/extra`). Paired, both bit "
        "widths pooled for `lsq_sam`, training-domain validation:",
        "",
        *comparison_table(extras),
    ]


def best_text(out: Path, scale: Scale, best: dict[str, dict]) -> list[str]:
    """The page's lines on the best-low-bit-model candidates: their paired differences, or
    that they have not run."""
    if not best:
        names = ", ".join(f"`{m}`" for m in BEST_METHODS)
        return [
            f"The candidates for the best low-bit model ({names}, "
            f"`{out.name}/best`) did not run in this study; `run --parts best` trains them.",
        ]
    return [
        f"The candidates for the best low-bit model (`{out.name}/best`, evaluated every "
        f"{BEST_CHECKPOINT_FREQ} steps): float `swad` against `erm`, `lsq_sam_swad` (SWAD's "
        "average on top of LSQ with SAM) and `qtdog` (QT-DoG's weights-only recipe) against "
        "`lsq_sam` and `lsq_sagm`; paired, both bit widths pooled, training-domain validation:",
        "",
        *comparison_table(best),
        "",
        "Where SWAD's window opened (each run's averaged final record):",
        "",
        *averaging_windows(out / "best", scale.bits),
    ]


def averaging_windows(best: Path, bits: tuple[int, ...]) -> list[str]:
    """One line per averaging candidate: which steps its runs averaged, and in how many
    the validation loss never stopped falling, so that SWAD fell back to the last
    evaluation interval alone (a window that opens spans at least three)."""
    lines = []
    for method in (m for m in BEST_METHODS if get_recipe(m).averaging != "none"):
        widths = bits if get_recipe(method).quantized else (None,)
        folders = [f for b in widths for f in runs_of(best, method, b)]
        finals = [r[-1] for r in map(records, folders) if r and r[-1].get("averaged")]
        if not finals:
            continue
        starts = [r["average_start_step"] for r in finals]
        counts = [r["averaged_steps"] for r in finals]
        fallback = sum(
            r["average_end_step"] == r["step"]
            and r["averaged_steps"] == r["args"]["checkpoint_freq"]
            for r in finals
        )
        lines.append(
            f"- `{method}` ({len(finals)} runs of {finals[0]['step']} steps): the average "
            f"starts between steps {min(starts)} and {max(starts)} (median "
            f"{int(np.median(starts))}) and covers {min(counts)} to {max(counts)} steps; in "
            f"{fallback} of them the validation loss never stopped falling and only the last "
            f"{finals[0]['args']['checkpoint_freq']} steps were averaged (SWAD's fallback)."
        )
    return lines


def ensembles_text(out: Path, ensembles: dict[str, dict]) -> list[str]:
    """The page's lines on EoQ's ensembles: each against its own members, or that none
    was built."""
    if not ensembles:
        return [
            f"EoQ's ensembles (`{out.name}/ensembles`) were not built in this study; "
            "`run --parts ensembles` evaluates them once their runs have finished.",
        ]
    return [
        f"EoQ's ensembles (`{out.name}/ensembles`, `gaqat ensemble`): the trial seeds' runs "
        "of one method, bit width and held-out domain as one model (the mean of their "
        "softmax outputs), each against the mean of its own members, paired by bit width "
        "and held-out domain (both bit widths pooled), training-domain validation:",
        "",
        *comparison_table(ensembles),
        *size_lines(ensembles),
    ]


def extras_conclusion(extras: dict[str, dict], part: str = "the extras") -> list[str]:
    return [
        f"- `{name}` ({part}): {diff_text(row)} ({verdict(row, name)})."
        for name, row in extras.items()
    ]


@dataclass(frozen=True)
class Summary:
    """What the study found, read from its folder: the page and the JSON say only this."""

    commit: str
    tau: float
    times: dict[str, float]  # median step time (s) per method and bit width
    curves: dict  # per held-out domain: the float runs' validation curves
    stats: dict[int, dict]  # freezing_stats of the main grid's gaqat runs per bit width
    panels: dict[str, list[dict]]  # per comparison: its paired rows, for the figure
    per_bits: dict[int, dict]  # gaqat − lsq_sagm pooled over domains, per bit width
    headline: dict[str, dict]  # "a − b": every pair of every bit width
    oracle3: dict  # gaqat − lsq_sagm at 3 bits, oracle selection
    ablations: list[tuple[str, dict]]  # (variant, gaqat − lsq_sagm at 3 bits)
    frozen: dict[str, str]  # per variant: how many step sizes froze, in words
    not_run: list[str]  # variants not (yet) finished
    extras: dict[str, dict]  # EXTRA_COMPARISONS, {} until every extra run is done
    best: dict[str, dict]  # BEST_COMPARISONS, {} until every best run is done
    ensembles: dict[str, dict]  # per method: its ensembles − their members, and their size

    def to_json(self, scale: Scale) -> dict:
        """The summary ``benchmarks/results/digits_study.json`` records."""
        return {
            "commit": self.commit,
            "scale": scale.__dict__,
            "step_times_s": self.times,
            "paired_gaqat_vs_lsq_sagm": {str(b): self.per_bits[b] for b in scale.bits},
            "paired_all_bit_widths": self.headline,
            "freezing": {
                str(b): {k: v for k, v in s.items() if k != "d_task"} for b, s in self.stats.items()
            },
            "ablations": {n: r for n, r in self.ablations},
            "ablations_not_run": self.not_run,
            "extras": self.extras,
            "best": self.best,
            "ensembles": self.ensembles,
        }


HEADLINE = (
    ("gaqat", "lsq_sagm"),
    ("lsq_sagm", "lsq"),
    ("lsq", "erm"),
    ("lsq_sagm", "erm"),
    ("gaqat", "erm"),
)


def summarize(out: Path, scale: Scale) -> Summary:
    """Read the study folder ``out`` into a :class:`Summary`."""
    main = out / "main"
    tau = 0.3 if not scale.hparams.get("tau") else scale.hparams["tau"]
    vs_lsq_sagm = paired([main], "lsq_sagm")
    stats = {b: freezing_stats(runs_of(main, "gaqat", b), tau) for b in scale.bits}
    ablations, frozen, not_run = _ablations(out, scale, vs_lsq_sagm, stats, tau)
    return Summary(
        commit=commit(),
        tau=tau,
        times=step_times(main, scale.bits),
        curves=erm_curves(main),
        stats=stats,
        panels={
            "gaqat − lsq_sagm": [r for r in vs_lsq_sagm if r["algorithm"] == "gaqat"],
            "lsq_sagm − lsq": [r for r in paired([main], "lsq") if r["algorithm"] == "lsq_sagm"],
            "gaqat − erm (float)": [r for r in paired([main], "erm") if r["algorithm"] == "gaqat"],
        },
        per_bits={b: all_domains(vs_lsq_sagm, "gaqat", str(b)) for b in scale.bits},
        headline={f"{a} − {b}": pooled([main], a, b) for a, b in HEADLINE},
        oracle3=all_domains(paired([main], "lsq_sagm", "oracle"), "gaqat", "3"),
        ablations=ablations,
        frozen=frozen,
        not_run=not_run,
        extras=extra_comparisons(out),
        best=extra_comparisons(out, "best"),
        ensembles=ensemble_gains(ensembles_of(out, scale)),
    )


def _ablations(out: Path, scale: Scale, vs_lsq_sagm: list[dict], stats: dict, tau: float):
    """The default and each finished variant: gaqat − lsq_sagm at 3 bits and what froze;
    and the variants not finished."""
    ablations = [("default (τ 0.3)", all_domains(vs_lsq_sagm, "gaqat", "3"))]
    frozen = {"default (τ 0.3)": _frozen_text(stats.get(3))}
    wanted = len(scale.seeds) * len(scale.ablation_envs)
    not_run = []
    for variant in scale.variants or VARIANTS:
        folder = out / "ablations" / variant
        done = _finished(folder, wanted)
        if done is None:
            not_run.append(variant)
            continue
        ablations.append((variant, all_domains(paired([folder], "lsq_sagm"), "gaqat", "3")))
        variant_tau = VARIANTS[variant].get("tau", tau)
        frozen[variant] = _frozen_text(freezing_stats(done, variant_tau))
    return ablations, frozen, not_run


def write_figures(main: Path, scale: Scale, summary: Summary, figures: Path) -> None:
    """The page's figures into ``figures``, with one gaqat run's own (``gaqat plot``)."""
    figures.mkdir(parents=True, exist_ok=True)
    figure_erm_curve(summary.curves, figures / "erm_curve.png")
    figure_paired(summary.panels, figures / "paired.png")
    figure_d_task(summary.stats, summary.tau, figures / "d_task.png")
    figure_freeze_timeline(main, scale.bits, figures / "freeze_timeline.png")
    figure_ablations(summary.ablations, figures / "ablations.png")
    example = next(iter(runs_of(main, "gaqat", min(scale.bits))), None)
    if example is not None:
        for png in plot_run(example, figures):
            png.rename(figures / f"example_{png.name}")


def write_page(out: Path, scale: Scale, quick: bool, doc: Path, json_path: Path) -> None:
    """The results page ``doc`` (figures in the folder beside it named after it) and the
    JSON summary ``json_path``, from the study folder ``out``."""
    summary = summarize(out, scale)
    write_figures(out / "main", scale, summary, doc.parent / doc.stem)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary.to_json(scale), indent=1) + "\n")
    doc.write_text(page_text(out, scale, quick, summary, doc.stem))


def page_text(out: Path, scale: Scale, quick: bool, summary: Summary, figures: str) -> str:
    """The page: ``templates/digits.md`` filled from ``summary`` and the report's tables
    (``figures``: the figures' folder, relative to the page)."""
    main, s = out / "main", summary
    extra = [main] + [out / p for p in ("extra", "best", "ensembles") if (out / p).is_dir()]
    domains = lambda envs: ", ".join(DOMAINS[e] for e in envs)  # noqa: E731
    return render(
        "digits.md",
        title_note=" (quick pipeline check)" if quick else "",
        commit=s.commit,
        quick_flag=" --quick" if quick else "",
        pipeline_warning=(
            "**A pipeline check on tiny runs: the numbers below mean nothing.**\n\n"
            if quick
            else ""
        ),
        float_steps=scale.float_steps,
        float_checkpoint_freq=scale.float_checkpoint_freq,
        test_domains=domains(scale.test_envs),
        seeds=", ".join(map(str, scale.seeds)),
        plateau=plateau_text(s.curves),
        bits=" and ".join(map(str, scale.bits)),
        steps=scale.steps,
        checkpoint_freq=scale.checkpoint_freq,
        window=scale.hparams.get("window", 50),
        tau=s.tau,
        ablation_domains=domains(scale.ablation_envs),
        figures=figures,
        step_time_table=[
            "| method | ms per step |",
            "|---|---|",
            *(f"| {k} | {1000 * v:.0f} |" for k, v in s.times.items()),
        ],
        step_time_ratios=_ratios(s.times, scale.bits),
        held_out=report([str(d) for d in extra], "markdown", "training"),
        extras=extras_text(out, scale, s.extras),
        best=best_text(out, scale, s.best),
        ensembles=ensembles_text(out, s.ensembles),
        oracle=report([str(main)], "markdown", "oracle"),
        headline_table=comparison_table(s.headline),
        vs_lsq_sagm=report([str(main)], "markdown", "training", "lsq_sagm"),
        vs_lsq=report([str(main)], "markdown", "training", "lsq"),
        vs_erm=report([str(main)], "markdown", "training", "erm"),
        freezing_table=_freezing_table(s.stats),
        frozen_by_layer=[
            f"- {b} bits: "
            + (", ".join(f"{k} {v}" for k, v in st["frozen_by_layer"].items()) or "none")
            for b, st in s.stats.items()
        ],
        ablations=_ablation_table(s),
        conclusion=[
            *_conclusion(
                s.headline, s.per_bits, s.stats, s.ablations, s.oracle3, s.tau, scale.steps
            ),
            *extras_conclusion(s.extras),
            *extras_conclusion(s.best, "the best low-bit model"),
            *extras_conclusion(s.ensembles, "EoQ's ensembles"),
        ],
    )


def _ratios(times: dict[str, float], bits: tuple[int, ...]) -> list[str]:
    """Per bit width, how much each method's step costs against the next cheaper one."""

    def ratio(a: str, b: str) -> str:
        return f"{times[a] / times[b]:.2f}×" if a in times and b in times else "–"

    return [
        f"- {b} bits: gaqat / lsq_sagm = {ratio(f'gaqat_w{b}', f'lsq_sagm_w{b}')}, "
        f"lsq_sagm / lsq = {ratio(f'lsq_sagm_w{b}', f'lsq_w{b}')}, "
        f"lsq / erm = {ratio(f'lsq_w{b}', 'erm')}"
        for b in bits
    ]


def _freezing_table(stats: dict[int, dict]) -> list[str]:
    return [
        "| bits | step sizes frozen | D_task mean | windows with D_task < τ "
        "| g_task, g_smooth of opposite signs | freeze steps |",
        "|---|---|---|---|---|---|",
        *(
            f"| {b} | {s['frozen']} of {s['step_sizes']} | {s['d_task_mean'] or 0:.2f} | "
            f"{100 * (s['below_tau'] or 0):.0f}% | {100 * (s['conflict_share'] or 0):.0f}% | "
            f"{', '.join(map(str, sorted(set(s['freeze_steps'])))) or '–'} |"
            for b, s in stats.items()
        ),
    ]


def _ablation_table(summary: Summary) -> list[str]:
    """The ablations' table, after a line naming the variants not run, if any."""
    not_run = (
        [
            "Not run in this study (the session's time ran out first; `run` again "
            f"trains them): {', '.join(f'`{v}`' for v in summary.not_run)}.",
            "",
        ]
        if summary.not_run
        else []
    )
    return [
        *not_run,
        "| variant | gaqat − lsq_sagm | step sizes frozen |",
        "|---|---|---|",
        *(f"| {n} | {diff_text(r)} | {summary.frozen[n]} |" for n, r in summary.ablations),
    ]


def _finished(folder: Path, wanted: int) -> list[Path] | None:
    """The variant's gaqat and lsq_sagm runs when all ``wanted`` pairs are done, else None
    (a study stopped part-way reports only the variants it finished)."""
    if not folder.is_dir():
        return None
    runs = {a: runs_of(folder, a, 3) for a in ("gaqat", "lsq_sagm")}
    if any(sum((r / DONE).exists() for r in found) < wanted for found in runs.values()):
        return None
    return runs["gaqat"]


def _frozen_text(stats: dict | None) -> str:
    if not stats or not stats["runs"]:
        return "–"
    return f"{stats['frozen']} of {stats['step_sizes']} in {stats['runs']} runs"


def _conclusion(headline, per_bits, stats, ablations, oracle3, tau, qat_steps) -> list[str]:
    main = headline["gaqat − lsq_sagm"]
    verdicts = {b: verdict(r) for b, r in per_bits.items()}
    lines = [
        f"- gaqat − lsq_sagm over both bit widths: {diff_text(main)}: {verdict(main)}.",
        *(
            f"- gaqat − lsq_sagm at {b} bits: {diff_text(r)}: {verdicts[b]}."
            for b, r in per_bits.items()
        ),
        f"- For scale: SAGM's own effect on QAT, lsq_sagm − lsq, is "
        f"{diff_text(headline['lsq_sagm − lsq'])} "
        f"({verdict(headline['lsq_sagm − lsq'], 'lsq_sagm − lsq')}); "
        f"quantization with plain LSQ against the float init, lsq − erm, "
        f"{diff_text(headline['lsq − erm'])} (the QAT runs also train {qat_steps} more steps "
        f"at a lower learning rate, so this is no pure cost of quantization).",
    ]
    beats = "gaqat better" in (verdict(main), *verdicts.values())
    lines.append(
        "- "
        + (
            "GAQAT beats LSQ+SAGM here."
            if beats
            else "GAQAT does not beat LSQ+SAGM on DigitsDG with these pairs."
        )
    )
    for b, s in stats.items():
        lines.append(
            f"- Why, at {b} bits: {s['frozen']} of {s['step_sizes']} step sizes froze; after "
            f"the warm-up window {100 * (s['below_tau'] or 0):.0f}% of (step size, window) "
            f"cells had D_task < τ = {tau} (mean D_task {s['d_task_mean'] or 0:.2f}), and the "
            f"window sums of g_task and g_smooth pointed in opposite directions in "
            f"{100 * (s['conflict_share'] or 0):.0f}% of cells."
        )
    lines.append(
        "- A frozen step size in mode task still moves by ½·g_smooth, and Adam normalises "
        "each step size's update to about the learning rate whatever its gradient's size, "
        "so freezing changes how a step size moves less than the task/smoothness split "
        "suggests; the `lr_scale*` and `freeze_all` ablations test that reading."
    )
    variants = [(name, row) for name, row in ablations[1:] if row and row.get("n")]
    if variants:
        ranked = sorted(variants, key=lambda a: float(a[1]["mean_diff"]))
        for label, (name, row) in (("most", ranked[-1]), ("least", ranked[0])):
            lines.append(
                f"- The ablation {label} favourable to GAQAT is `{name}`: {diff_text(row)} "
                f"({verdict(row)})."
            )
        decided = [n for n, r in variants if verdict(r) != "no difference beyond noise"]
        lines.append(
            "- Beyond two standard errors: "
            + (
                ", ".join(f"`{n}` ({verdict(r)})" for n, r in variants if n in decided)
                if decided
                else "none"
            )
            + f", out of {len(variants)} variants of 6 pairs each, where one or two such "
            "outcomes are what chance alone gives at this many comparisons."
        )
    if oracle3:
        lines.append(f"- Under the oracle, at 3 bits: {diff_text(oracle3)}.")
    return lines


def pairs_so_far(out: Path, scale: Scale) -> dict[str, dict]:
    """Every comparison the page makes (headline, extras, best, ensembles) over the pairs
    of the runs finished so far: what a study still training, or one trained only in
    part, shows."""
    folders = [out / p for p in ("main", "extra", "best") if (out / p).is_dir()]
    return {
        **{
            f"{a} − {b}": pooled(folders, a, b, finished_only=True)
            for a, b in (*HEADLINE, *EXTRA_COMPARISONS, *BEST_COMPARISONS)
        },
        **ensemble_gains(ensembles_of(out, scale)),
    }


def write_pairs(out: Path, scale: Scale, json_path: Path) -> None:
    """Print :func:`pairs_so_far` as a table and write it to ``json_path``."""
    rows = pairs_so_far(out, scale)
    print("\n".join(comparison_table(rows)))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"commit": commit(), "pairs": rows}, indent=1) + "\n")
    print(f"wrote {json_path}")


def _results_file(args, name: str) -> Path:
    """Where an action writes ``name``: benchmarks/results, or the study folder (--quick)."""
    return args.out / name if args.quick else ROOT / "benchmarks" / "results" / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "action",
        choices=("run", "page", "pairs", "archive"),
        help="train; write the results page; print the page's paired comparisons over "
        "the runs finished so far; or archive the finished runs' records",
    )
    parser.add_argument("out", type=Path, help="the study folder")
    parser.add_argument("--quick", action="store_true", help="tiny runs: a pipeline check")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--data-dir", type=Path, help="DigitsDG cache folder")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=PARTS,
        help="with run: which sweeps to train (default all, in this order)",
    )
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    if args.action == "run":
        with sigterm_as_interrupt():  # a killed study stops its workers too
            run_study(args.out, scale, args.jobs, args.threads, args.data_dir, args.parts)
    elif args.action == "archive":
        path = _results_file(args, "digits_study_records.tar.xz")
        print(f"wrote {archive_records(args.out, path)} runs' records to {path}")
    elif args.action == "pairs":
        write_pairs(args.out, scale, _results_file(args, "digits_study_pairs.json"))
    else:
        if args.quick:
            doc, json_path = (
                args.out / "page" / "digits.md",
                args.out / "page" / "digits_study.json",
            )
        else:
            doc = ROOT / "docs" / "results" / "digits.md"
            json_path = ROOT / "benchmarks" / "results" / "digits_study.json"
        write_page(args.out, scale, args.quick, doc, json_path)
        print(f"wrote {doc} and {json_path}")


if __name__ == "__main__":
    main()
