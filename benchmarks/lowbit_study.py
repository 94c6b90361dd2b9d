"""Where low bits hurt: what quantization costs per network, bit width and shift, then
the paired comparison of the QAT methods where that cost is large.

    python benchmarks/lowbit_study.py run OUT [--quick] [--jobs 2 --threads 1] [--parts ...]
    python benchmarks/lowbit_study.py page OUT [--quick]

``run`` trains every run into OUT (idempotent: a stopped study resumes when launched
again), in the order of :data:`PARTS`:

- ``cost``: per network of :data:`FULL`, float ``erm`` and ``lsq`` at every bit width
  (``OUT/<arch>``), and the fair float baseline (``OUT/<arch>_fair``): ``erm`` continued
  from the same float checkpoint for the QAT runs' steps at their learning rate, so the
  difference is quantization's, not that of QAT's extra training;
- ``corruptions``: the ``lsq`` runs and their fair baselines evaluated on ImageNet-C
  corruptions of their own evaluation images (``gaqat corrupt``'s ``corruptions.jsonl``);
- ``compare``: in the regimes chosen from the cost map (:attr:`Scale.compare`), ``lsq``,
  ``lsq_sam``, ``lsq_sagm`` and ``gaqat`` from the same float inits, paired as the
  DigitsDG study pairs them;
- ``ablations``: gaqat with each change of :data:`VARIANTS`, on two held-out domains
  (``OUT/<arch>_ablations/<variant>``), paired with the default gaqat;
- ``best``: the candidates for the best low-bit model (:data:`BEST_METHODS`: weight
  averaging on lsq_sam, QT-DoG's recipe) from the same float inits on the comparison's
  seeds (``OUT/<arch>_best``, the inits linked), paired with ``lsq_sam``: the 24 pairs a
  comparison needs; evaluated every
  :data:`BEST_CHECKPOINT_FREQ` steps, so that SWAD's window rule sees a validation-loss
  curve rather than three points;
- ``ensembles``: EoQ's ensembles (``gaqat ensemble``) of the comparison's runs of each of
  :data:`ENSEMBLE_METHODS` over the ablations' seeds, one per held-out domain
  (``OUT/<arch>_ensembles``), each against the mean of its own members;
- ``integer``: what the quantizers of one integer region (int8 first and last layers,
  8-bit residual quantizers: what lets onnxruntime run the whole network as integer
  kernels) cost in accuracy: ``lsq`` at the deployment width with each change of
  :data:`INTEGER_VARIANTS` (``OUT/<arch>_integer/<variant>``), paired with plain ``lsq``.

``page`` writes ``docs/results/lowbit.md`` (``benchmarks/templates/lowbit.md`` filled in)
with its figures and ``benchmarks/results/lowbit_study.json`` (``--quick``: into
OUT/page). ``--quick`` runs the pipeline in minutes on tiny runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import numpy as np
from digits_study import DOMAINS, freezing_stats, link_shared, runs_of
from matplotlib.figure import Figure
from study_ensembles import (
    EnsembleJob,
    build_ensembles,
    by_draw,
    ensemble_gains,
    ensemble_jobs,
    paired_difference,
    selected,
    size_lines,
)
from study_page import ROOT, commit, comparison_table, diff_text, render, verdict

from gaqat.hparams import default_hparams
from gaqat.launchers import InlineLauncher, ProcessLauncher, sigterm_as_interrupt
from gaqat.report.runs import load_runs
from gaqat.report.table import Difference
from gaqat.selection import SELECTION_METHODS
from gaqat.sweep import SweepConfig, fair_float_baseline, launch, plan

# A regime qualifies where lsq loses at least this many points against the fair float
# baseline, and the loss is beyond two standard errors.
QUALIFYING_LOSS = 2.0
COMPARE_METHODS = ("lsq", "lsq_sam", "lsq_sagm", "gaqat")
MIN_PAIRS = 24  # per comparison, as the DigitsDG study had
BEST_METHODS = ("lsq_sam_swad", "qtdog")  # each against lsq_sam and lsq_sagm, once run
BEST_CHECKPOINT_FREQ = 25
ENSEMBLE_METHODS = ("lsq", "lsq_sam")
# The ablations the DigitsDG study found most informative, and the momentum question.
VARIANTS = {
    "tau0.1": {"tau": 0.1},
    "window25": {"window": 25},
    "freeze_all": {"freeze_mode": "all"},
    "reset_momentum": {"freeze_resets_momentum": True},
}
# The integer region's quantizers (docs/deployment.md), each a change to plain lsq, whose
# first and last layers stay float and whose residual stream is not quantized.
INTEGER_VARIANTS = {
    "int8_ends": {"first_last": "int8"},
    "residual8": {"residual_bits": 8},
    "one_region": {"first_last": "int8", "residual_bits": 8},
}
SHIFTS = {  # the cost map's columns: which accuracy of a run each reads
    "held_out": "held-out domain",
    "corrupted_held_out": "held-out domain, corrupted",
    "corrupted_validation": "training domains, corrupted",
}


@dataclass(frozen=True)
class Grid:
    """One network of the cost map: its seeds and bit widths, every held-out domain."""

    arch: str
    seeds: tuple[int, ...]
    bits: tuple[int, ...]
    test_envs: tuple[int, ...] = (0, 1, 2, 3)
    image_size: int | None = None  # None: DigitsDG's 32
    gpu: bool = False  # trained only when named (--networks): too slow for a CPU


@dataclass(frozen=True)
class Regime:
    """Where the methods are compared: a network at some bit widths, with its seeds."""

    arch: str
    bits: tuple[int, ...]
    seeds: tuple[int, ...]
    test_envs: tuple[int, ...] = (0, 1, 2, 3)
    ablation_envs: tuple[int, ...] = (1, 2)
    ablation_seeds: tuple[int, ...] | None = None  # None: the comparison's seeds


@dataclass(frozen=True)
class IntegerCheck:
    """What the integer region costs a network: ``lsq`` with each of ``variants`` (names
    of :data:`INTEGER_VARIANTS`) against plain ``lsq``, from the same float inits."""

    arch: str
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    bits: tuple[int, ...] = (4,)  # the width edge deployments ship
    test_envs: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class Scale:
    """How long the study's runs are and which grids it trains."""

    steps: int
    checkpoint_freq: int
    float_steps: int
    float_checkpoint_freq: int
    grids: tuple[Grid, ...]
    compare: tuple[Regime, ...]
    corruptions: str | tuple[str, ...] = "benchmark"  # a set of gaqat.corruptions, or names
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    per_domain: int = 200
    hparams: dict = field(default_factory=dict)
    variants: tuple[str, ...] = tuple(VARIANTS)
    integer: tuple[IntegerCheck, ...] = ()


FULL = Scale(
    steps=300,
    checkpoint_freq=100,
    float_steps=1000,
    float_checkpoint_freq=100,
    grids=(  # one seed where quantization costs little, three where it costs most
        Grid("small_cnn", seeds=(0,), bits=(4, 3)),
        Grid("small_cnn", seeds=(0, 1, 2), bits=(2,)),
        Grid("mobilenet_v2_compact", seeds=(0,), bits=(4, 2)),
        Grid("mobilenet_v2_compact", seeds=(0,), bits=(3,)),
        # ImageNet-pretrained, fine-tuned at 64x64 (its last maps 2x2): a float step of 96
        # images took 5.4 s on this machine's busy CPU, so it waits for a GPU (--device cuda).
        Grid("efficientnet_lite0", seeds=(0,), bits=(4, 3, 2), image_size=64, gpu=True),
    ),
    # 4 held-out domains x 6 trial seeds: the 24 pairs a comparison needs
    compare=(Regime("small_cnn", bits=(2,), seeds=tuple(range(6)), ablation_seeds=(0, 1, 2)),),
    integer=(  # the small CNN has no residual blocks; the compact MobileNetV2 has five
        IntegerCheck("small_cnn", seeds=(0, 1, 2), variants=("int8_ends",)),
        # one seed, its cost grid's: a float init of another takes 15 min on this CPU
        IntegerCheck("mobilenet_v2_compact", seeds=(0,), variants=("residual8", "one_region")),
    ),
)
QUICK = Scale(
    steps=20,
    checkpoint_freq=10,
    float_steps=30,
    float_checkpoint_freq=10,
    grids=(Grid("small_cnn", seeds=(0, 1), bits=(2,), test_envs=(1,)),),
    compare=(Regime("small_cnn", bits=(2,), seeds=(0, 1), test_envs=(1,), ablation_envs=(1,)),),
    corruptions=("gaussian_noise", "contrast"),
    severities=(1, 5),
    per_domain=50,
    hparams={"window": 5, "bn_recompute_steps": 10},
    variants=("tau0.1", "reset_momentum"),
    integer=(IntegerCheck("small_cnn", seeds=(0,), variants=("int8_ends",), test_envs=(1,)),),
)
PARTS = ("cost", "corruptions", "compare", "ablations", "best", "ensembles", "integer")


def _corruptions() -> ModuleType:
    """``gaqat.corruptions``, imported where used: it needs the ``corruptions`` extra,
    which training the study does not."""
    return importlib.import_module("gaqat.corruptions")


# --- training ------------------------------------------------------------------------------


def _sweep(out: Path, scale: Scale, arch: str, algorithms, bits, seeds, test_envs, run, **extra):
    """A sweep of ``arch`` (small_cnn, DigitsDG's default network, passes no ``arch``, so
    its runs are those of a plain ``gaqat sweep``); ``run``: the shared run options
    (``data_dir``, ``device``, ``image_size``)."""
    wanted = {**scale.hparams, **({} if arch == "small_cnn" else {"arch": arch}), **extra}
    known = set().union(*(default_hparams(a, "digits") for a in ("erm", *algorithms)))
    return SweepConfig(
        "digits",
        out,
        algorithms,
        test_envs=test_envs,
        bits=bits,
        seeds=seeds,
        options={
            "steps": scale.steps,
            "checkpoint_freq": scale.checkpoint_freq,
            "hparams": {k: v for k, v in wanted.items() if k in known},
            "progress": False,
            **{k: v for k, v in run.items() if v is not None},
        },
        float_options={"steps": scale.float_steps, "checkpoint_freq": scale.float_checkpoint_freq},
    )


def cost_sweep(out: Path, scale: Scale, grid: Grid, run: dict) -> SweepConfig:
    args = (grid.arch, ("lsq",), grid.bits, grid.seeds, grid.test_envs)
    return _sweep(out / grid.arch, scale, *args, {**run, "image_size": grid.image_size})


def _launch_variants(
    base: SweepConfig, variants: dict[str, dict], main: Path, workers: int, threads: int | None
) -> None:
    """``base`` once per variant, its hparams changed, into ``base.output/<name>``; the runs
    it shares with ``main`` (the float inits) are linked, not trained again."""
    for name, changes in variants.items():
        hparams = {**base.options["hparams"], **changes}
        folder = base.output / name
        jobs = plan(replace(base, output=folder, options={**base.options, "hparams": hparams}))
        link_shared(jobs, main)
        print(f"== {folder}", flush=True)
        _launch(jobs, workers, threads)


def _launch(jobs, workers: int, threads: int | None) -> None:
    launcher = ProcessLauncher(workers, threads) if workers > 1 else InlineLauncher(threads)
    outcomes = launch(jobs, launcher=launcher, note=lambda line: print(line, flush=True))
    failed = [o for o in outcomes if o.status not in ("kept", "ran")]
    if failed or len(outcomes) < len(jobs):
        raise SystemExit(f"{len(failed)} runs failed or were skipped; launch the study again")


def run_study(
    out: Path,
    scale: Scale,
    workers: int,
    threads: int | None,
    data_dir=None,
    parts=PARTS,
    device: str | None = None,
) -> None:
    run = {"data_dir": data_dir, "device": device}
    for grid in scale.grids if "cost" in parts else ():
        config = cost_sweep(out, scale, grid, run)
        print(f"== {config.output}", flush=True)
        _launch(plan(config), workers, threads)
        print(f"== {out / f'{grid.arch}_fair'}", flush=True)
        _launch(fair_float_baseline(config, out / f"{grid.arch}_fair"), workers, threads)
    for grid in scale.grids if "corruptions" in parts else ():
        folders = cost_pairs_folders(out, grid)
        print(f"== corruptions of {len(folders)} {grid.arch} runs", flush=True)
        _corruptions().evaluate_corruptions(
            folders,
            corruptions=scale.corruptions,
            severities=scale.severities,
            per_domain=scale.per_domain,
            data_dir=data_dir,
            device=device or "cpu",
        )
    for regime in scale.compare if "compare" in parts else ():
        args = (regime.arch, COMPARE_METHODS, regime.bits, regime.seeds, regime.test_envs)
        config = _sweep(out / regime.arch, scale, *args, run)
        print(f"== {config.output}: the comparison", flush=True)
        _launch(plan(config), workers, threads)
    for regime in scale.compare if "ablations" in parts else ():
        seeds = regime.ablation_seeds or regime.seeds
        args = (regime.arch, ("gaqat",), regime.bits, seeds, regime.ablation_envs)
        base = _sweep(out / f"{regime.arch}_ablations", scale, *args, run)
        variants = {name: VARIANTS[name] for name in scale.variants}
        _launch_variants(base, variants, out / regime.arch, workers, threads)
    for regime in scale.compare if "best" in parts else ():
        args = (regime.arch, BEST_METHODS, regime.bits, regime.seeds, regime.test_envs)
        often = {**run, "checkpoint_freq": min(BEST_CHECKPOINT_FREQ, scale.checkpoint_freq)}
        jobs = plan(_sweep(out / f"{regime.arch}_best", scale, *args, often))
        link_shared(jobs, out / regime.arch)  # the float inits
        print(f"== {out / f'{regime.arch}_best'}: the best low-bit model's candidates", flush=True)
        _launch(jobs, workers, threads)
    for regime in scale.compare if "ensembles" in parts else ():
        build_ensembles(regime_ensembles(out, regime), data_dir, device)
    for check in scale.integer if "integer" in parts else ():
        args = (check.arch, ("lsq",), check.bits, check.seeds, check.test_envs)
        print(f"== {out / check.arch}: plain lsq, as the integer region's baseline", flush=True)
        plain = _sweep(out / check.arch, scale, *args, run)
        _launch(plan(plain), workers, threads)
        base = replace(plain, output=out / f"{check.arch}_integer")
        variants = {name: INTEGER_VARIANTS[name] for name in check.variants}
        _launch_variants(base, variants, out / check.arch, workers, threads)


# --- reading the study ---------------------------------------------------------------------


def runs_at(folder: Path, method: str, bits) -> list[Path]:
    """The run folders of ``method`` below ``folder`` at each of the bit widths ``bits``."""
    return [f for b in bits for f in runs_of(folder, method, b)]


def regime_ensembles(out: Path, regime: Regime) -> list[EnsembleJob]:
    """The regime's ensembles: of :data:`ENSEMBLE_METHODS`' runs over the ablations' seeds,
    one per bit width and held-out domain, in ``OUT/<arch>_ensembles``."""
    runs = {(m, b): runs_of(out / regime.arch, m, b) for m in ENSEMBLE_METHODS for b in regime.bits}
    seeds = regime.ablation_seeds or regime.seeds
    return ensemble_jobs(runs, out / f"{regime.arch}_ensembles", regime.test_envs, seeds)


def cost_pairs_folders(out: Path, grid: Grid) -> list[Path]:
    """The finished lsq runs of a grid (its seeds and domains: the comparison trains lsq
    on more seeds) and their fair float baselines."""
    lsq = runs_at(out / grid.arch, "lsq", grid.bits)
    folders = lsq + runs_of(out / f"{grid.arch}_fair", "erm")
    runs = load_runs(folders) if folders else []
    return [
        run.path.parent
        for run in runs
        if run.complete and run.trial_seed in grid.seeds and run.test_envs[0] in grid.test_envs
    ]


def _accuracies(run) -> dict[str, float | None]:
    """A run's accuracy (fraction) under each of :data:`SHIFTS`: held-out by
    training-domain validation; the corrupted ones of its final model, once evaluated."""
    chosen = SELECTION_METHODS["training"].run_acc(run.records)
    result = _corruptions().load_corruptions(run.path.parent)
    return {
        "held_out": chosen[1] if chosen else None,
        "corrupted_held_out": result.mean_accuracy("held out") if result else None,
        "corrupted_validation": result.mean_accuracy("validation") if result else None,
    }


def cost_map(out: Path, grid: Grid) -> list[dict]:
    """Per bit width and shift: lsq's and the fair float baseline's mean accuracy (%) and
    the cost, fair float − lsq in points (positive: quantization loses), over the grid's
    (held-out domain, seed) pairs that both have."""
    fair = {
        k: _accuracies(r) for k, r in by_draw(runs_of(out / f"{grid.arch}_fair", "erm")).items()
    }
    rows = []
    for bits in grid.bits:
        lsq_runs = by_draw(runs_of(out / grid.arch, "lsq", bits)).items()
        # the grid's draws only: other parts train lsq on more seeds
        lsq = {
            k: _accuracies(r) for k, r in lsq_runs if k[0] in grid.test_envs and k[1] in grid.seeds
        }
        for shift in SHIFTS:
            keys = [k for k in lsq if k in fair and None not in (lsq[k][shift], fair[k][shift])]
            if not keys:
                continue
            cost = Difference(tuple(fair[k][shift] - lsq[k][shift] for k in keys), False)
            rows.append(
                {
                    "arch": grid.arch,
                    "bits": bits,
                    "shift": shift,
                    "pairs": len(keys),
                    "float_acc": 100 * float(np.mean([fair[k][shift] for k in keys])),
                    "lsq_acc": 100 * float(np.mean([lsq[k][shift] for k in keys])),
                    "cost": cost.mean,
                    "stderr": None if cost.stderr is None else float(cost.stderr),
                    "qualifies": qualifies(cost.mean, cost.stderr),
                }
            )
    return rows


def qualifies(cost: float, stderr: float | None) -> bool:
    """At least :data:`QUALIFYING_LOSS` points lost, beyond two standard errors."""
    return bool(stderr is not None and cost >= QUALIFYING_LOSS and cost > 2 * stderr)


def extra_training_gain(out: Path, arch: str) -> Difference | None:
    """Held-out accuracy of the fair float baseline − its float init: what the QAT runs'
    extra steps give a float model, which a comparison with the init would credit to QAT."""
    gain = paired_difference(
        selected(runs_of(out / f"{arch}_fair", "erm")), selected(runs_of(out / arch, "erm"))
    )
    return gain if gain.values else None


def _cost(row: dict) -> str:
    stderr = f" ± {row['stderr']:.2f}" if row["stderr"] is not None else ""
    return f"{row['cost']:+.2f}{stderr}"


def cost_table(rows: list[dict]) -> list[str]:
    lines = [
        "| network | bits | shift | pairs | float (continued) | lsq | cost (points) | qualifies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['bits']} | {SHIFTS[r['shift']]} | {r['pairs']} | "
            f"{r['float_acc']:.1f} | {r['lsq_acc']:.1f} | {_cost(r)} | "
            f"{'yes' if r['qualifies'] else 'no'} |"
        )
    return lines


def comparisons(out: Path, regime: Regime) -> dict[str, dict]:
    """The headline paired differences of a regime over its finished pairs, every bit
    width pooled, as ``Difference.stats`` (the report's CSV columns)."""
    folders = {m: out / regime.arch for m in COMPARE_METHODS}
    folders |= {m: out / f"{regime.arch}_best" for m in BEST_METHODS}
    accs = {m: selected(runs_at(folder, m, regime.bits)) for m, folder in folders.items()}
    names = [(m, "lsq") for m in COMPARE_METHODS[1:]] + [
        ("gaqat", "lsq_sagm"),
        ("lsq_sam", "lsq_sagm"),
        ("gaqat", "lsq_sam"),  # the baseline every candidate for the best model meets
    ]
    names += [(m, b) for m in BEST_METHODS for b in ("lsq_sam", "lsq_sagm") if accs[m]]
    return {f"{a} − {b}": paired_difference(accs[a], accs[b]).stats() for a, b in names}


def ablations(out: Path, regime: Regime, scale: Scale) -> list[tuple[str, Difference, int]]:
    """Per variant: gaqat with it − default gaqat (same init, seed and batches), and how many
    step sizes froze in its runs."""
    main = selected(runs_at(out / regime.arch, "gaqat", regime.bits))
    tau = default_hparams("gaqat", "digits")["tau"]
    rows = []
    for name in scale.variants:
        folder = out / f"{regime.arch}_ablations" / name
        mine = runs_at(folder, "gaqat", regime.bits)
        if mine:
            frozen = freezing_stats(mine, tau)["frozen"]
            rows.append((name, paired_difference(selected(mine), main), frozen))
    return rows


def integer_costs(out: Path, check: IntegerCheck) -> dict[str, Difference]:
    """Per variant with finished runs: held-out accuracy of lsq with it − plain lsq,
    paired by (bits, held-out domain, trial seed)."""
    plain = selected(runs_at(out / check.arch, "lsq", check.bits))
    found = {}
    for name in check.variants:
        folder = out / f"{check.arch}_integer" / name
        mine = runs_at(folder, "lsq", check.bits)
        if mine:
            found[name] = paired_difference(selected(mine), plain)
    return found


# --- figures -------------------------------------------------------------------------------


def figure_cost(rows: list[dict], path: Path) -> None:
    """Quantization's cost per network and bit width, one bar per shift."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    groups = list(dict.fromkeys((r["arch"], r["bits"]) for r in rows))
    for j, shift in enumerate(SHIFTS):
        mine = {(r["arch"], r["bits"]): r for r in rows if r["shift"] == shift}
        xs = np.arange(len(groups)) + (j - 1) * 0.27
        ax.bar(
            xs,
            [mine[g]["cost"] if g in mine else 0 for g in groups],
            0.27,
            yerr=[(mine[g]["stderr"] or 0) if g in mine else 0 for g in groups],
            capsize=3,
            label=SHIFTS[shift],
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(QUALIFYING_LOSS, color="grey", ls="--", lw=0.8)
    ax.set_xticks(range(len(groups)), [f"{a}\n{b} bits" for a, b in groups], fontsize=7)
    ax.set_ylabel("fair float − lsq (points)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def severity_curve(result, role: str) -> list[float]:
    """Clean accuracy, then the mean over corruptions at each severity 1, 2, ..."""
    return [result.clean_accuracy(role)] + [
        float(np.mean([result.accuracy(role, c, s) for c in result.corruptions]))
        for s in result.severities
    ]


def figure_severity(out: Path, arch: str, bits: tuple[int, ...], path: Path) -> None:
    """Mean accuracy over the corruptions at each severity: the fair float baseline and
    lsq at each bit width, held-out domains and training domains."""
    fig = Figure(figsize=(8, 3.4))
    series = {"float (continued)": runs_of(out / f"{arch}_fair", "erm")}
    series |= {f"lsq {b} bits": runs_of(out / arch, "lsq", b) for b in bits}
    for k, role in enumerate(("held out", "validation")):
        ax = fig.add_subplot(1, 2, k + 1)
        for label, folders in series.items():
            results = [r for r in map(_corruptions().load_corruptions, folders) if r is not None]
            if results:
                curve = np.mean([severity_curve(r, role) for r in results], 0)
                ax.plot(range(len(curve)), 100 * curve, marker="o", label=label)
        ax.set_xlabel("severity (0: clean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{arch}: {role} domains", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- the page ------------------------------------------------------------------------------


def _diff(d: Difference | None) -> str:
    if d is None or not d.values:
        return "no pairs"
    wins, ties, losses = d.counts
    stderr = f" ± {d.stderr:.2f}" if d.stderr is not None else ""
    return f"{d.mean:+.2f}{stderr} points over {len(d.values)} pairs ({wins}/{ties}/{losses})"


def integer_table(scale: Scale, costs: dict[str, dict[str, Difference]]) -> list[str]:
    """One row per network and variant measured: what it quantizes, and its difference."""
    rows = [
        f"| `{check.arch}` | {', '.join(map(str, check.bits))} | {name} | "
        + ", ".join(f"`{k}={v}`" for k, v in INTEGER_VARIANTS[name].items())
        + f" | {_diff(costs[check.arch][name])} |"
        for check in scale.integer
        for name in check.variants
        if name in costs.get(check.arch, {})
    ]
    header = "| network | bits | variant | hparams | variant − plain lsq |"
    return [header, "|---|---|---|---|---|", *rows] if rows else ["Not measured yet."]


def setup_lines(scale: Scale) -> list[str]:
    grids = "; ".join(
        f"`{g.arch}`{f' at {g.image_size}×{g.image_size}' if g.image_size else ''}: "
        f"{', '.join(map(str, g.bits))} bits on trial seeds {', '.join(map(str, g.seeds))}"
        for g in scale.grids
    )
    names = _corruptions().corruption_names(scale.corruptions)
    return [
        f"- Float `erm`, {scale.float_steps} steps, then `lsq` from it for {scale.steps} steps "
        f"at the QAT learning rate (the same init, seed and batches), every DigitsDG domain "
        f"held out in turn. {grids}.",
        f"- The fair float baseline: `erm` continued from the same float checkpoint for the "
        f"same {scale.steps} steps at the same learning rate and schedule (`OUT/<arch>_fair`).",
        f"- Corruptions: {', '.join(names)} at severities "
        f"{', '.join(map(str, scale.severities))}, on the first {scale.per_domain} evaluation "
        "images of each domain (`gaqat corrupt`); the final model of each run.",
        "- Held-out accuracy by training-domain validation; costs are paired differences "
        "over (held-out domain, trial seed), mean ± standard error (ddof 1).",
    ]


def widths(scale: Scale) -> dict[str, tuple[int, ...]]:
    """Each network of the cost map and its bit widths, widest first."""
    found: dict[str, set[int]] = {}
    for grid in scale.grids:
        found.setdefault(grid.arch, set()).update(grid.bits)
    return {arch: tuple(sorted(bits, reverse=True)) for arch, bits in found.items()}


def write_page(out: Path, scale: Scale, quick: bool, doc: Path, json_path: Path) -> None:
    figures = doc.parent / "lowbit"
    figures.mkdir(parents=True, exist_ok=True)
    rows = [r for g in scale.grids for r in cost_map(out, g)]
    figure_cost(rows, figures / "cost.png")
    networks = {arch: bits for arch, bits in widths(scale).items() if (out / arch).is_dir()}
    gains = {arch: extra_training_gain(out, arch) for arch in networks}
    for arch, bits in networks.items():
        figure_severity(out, arch, bits, figures / f"severity_{arch}.png")
    heads = {
        r.arch: {**comparisons(out, r), **ensemble_gains(regime_ensembles(out, r))}
        for r in scale.compare
    }
    tau = default_hparams("gaqat", "digits")["tau"]
    freezing = {
        r.arch: freezing_stats(runs_at(out / r.arch, "gaqat", r.bits), tau) for r in scale.compare
    }
    ablation_rows = {r.arch: ablations(out, r, scale) for r in scale.compare}
    integer = {c.arch: integer_costs(out, c) for c in scale.integer}
    text = render(
        "lowbit.md",
        commit=commit(),
        setup=setup_lines(scale),
        cost=cost_table(rows),
        gains=[f"- `{a}`: {_diff(d)}" for a, d in gains.items()],
        severity=[f"![{arch} severity](lowbit/severity_{arch}.png)" for arch in networks],
        regimes=regime_lines(scale, rows),
        compare=[
            line
            for arch, head in heads.items()
            for line in (f"### `{arch}`", "", *comparison_table(head), *size_lines(head), "")
        ],
        freezing=[freezing_line(arch, s, tau) for arch, s in freezing.items()],
        ablations=[
            line
            for arch, abl in ablation_rows.items()
            for line in (
                f"`{arch}`, variant − default gaqat:",
                "",
                "| variant | difference | step sizes frozen |",
                "|---|---|---|",
                *(f"| {n} | {_diff(d)} | {f} |" for n, d, f in abl),
                "",
            )
        ],
        integer=integer_table(scale, integer),
        conclusion=conclusion(scale, rows, heads),
    )
    doc.write_text(text, encoding="utf-8")
    summary = {
        "commit": commit(),
        "quick": quick,
        "cost": rows,
        "extra_training_gain": {a: d.stats() if d else None for a, d in gains.items()},
        "comparisons": heads,
        "freezing": {a: {k: v for k, v in s.items() if k != "d_task"} for a, s in freezing.items()},
        "ablations": {
            a: {n: {**d.stats(), "frozen": f} for n, d, f in abl}
            for a, abl in ablation_rows.items()
        },
        "integer": {a: {n: d.stats() for n, d in c.items()} for a, c in integer.items()},
    }
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {doc} and {json_path}")


def freezing_line(arch: str, stats: dict, tau: float) -> str:
    """What freezing did in a regime's gaqat runs, in one line."""
    if not stats["runs"]:
        return f"- `{arch}`: no gaqat run yet."
    number = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (
        f"- `{arch}`: {stats['frozen']} freezes of {stats['step_sizes']} step sizes over "
        f"{stats['runs']} gaqat runs (steps {stats['freeze_steps'][:10]}); mean D_task after "
        f"the first window {number(stats['d_task_mean'])}, share of windows below τ = {tau}: "
        f"{number(stats['below_tau'])}; share of windows where g_task and g_smooth conflict: "
        f"{number(stats['conflict_share'])}."
    )


def regime_lines(scale: Scale, rows: list[dict]) -> list[str]:
    found = [r for r in rows if r["qualifies"]]
    lines = [
        f"Qualifying (≥ {QUALIFYING_LOSS:g} points lost, beyond two standard errors): "
        + (
            ", ".join(f"`{r['arch']}` at {r['bits']} bits ({SHIFTS[r['shift']]})" for r in found)
            or "none"
        )
        + "."
    ]
    lines += [
        f"Compared: `{r.arch}` at {', '.join(map(str, r.bits))} bits, held-out "
        f"{', '.join(DOMAINS[e] for e in r.test_envs)}, trial seeds {', '.join(map(str, r.seeds))}."
        for r in scale.compare
    ]
    return lines


def conclusion(scale: Scale, rows: list[dict], heads: dict[str, dict]) -> list[str]:
    """What the numbers say, network by network, then each comparison with its verdict."""
    lines = []
    for grid in {g.arch: g for g in scale.grids}.values():
        for shift, words in SHIFTS.items():
            mine = [r for r in rows if r["arch"] == grid.arch and r["shift"] == shift]
            costs = ", ".join(f"{_cost(r)} at {r['bits']} bits ({r['pairs']} pairs)" for r in mine)
            if mine:
                lines.append(f"- `{grid.arch}`, {words}: quantization costs {costs} points.")
        if not any(r["arch"] == grid.arch for r in rows):
            wait = " (its grid waits for a GPU)" if grid.gpu else ""
            lines.append(f"- `{grid.arch}`: not measured yet{wait}.")
    for regime in scale.compare:
        head = heads[regime.arch]
        pairs = max((int(row["n"]) for row in head.values()), default=0)
        enough = "" if pairs >= MIN_PAIRS else ": too few to decide, the differences so far"
        lines.append(
            f"- The comparison at `{regime.arch}`, {', '.join(map(str, regime.bits))} bits, has "
            f"{pairs} finished pairs of the {MIN_PAIRS} it needs{enough}:"
        )
        lines += [
            f"  - {name}: {diff_text(row)} ({verdict(row, name)})." for name, row in head.items()
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "page"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the pipeline")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=None, help="threads per run")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--networks", nargs="+", help="train these networks' grids only")
    parser.add_argument("--data-dir", type=Path, default=None, help="DigitsDG's cache folder")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    if args.action == "run":
        named = lambda arch: arch in args.networks if args.networks else True  # noqa: E731
        scale = replace(
            scale,
            grids=tuple(g for g in scale.grids if named(g.arch) and (args.networks or not g.gpu)),
            compare=tuple(r for r in scale.compare if named(r.arch)),
            integer=tuple(c for c in scale.integer if named(c.arch)),
        )
    if args.action == "run":
        with sigterm_as_interrupt():  # a killed study stops its workers too
            options = (args.data_dir, args.parts, args.device)
            run_study(args.out, scale, args.jobs, args.threads, *options)
    elif args.quick:
        write_page(
            args.out,
            scale,
            True,
            args.out / "page" / "lowbit.md",
            args.out / "page" / "lowbit.json",
        )
    else:
        write_page(
            args.out,
            scale,
            False,
            ROOT / "docs" / "results" / "lowbit.md",
            ROOT / "benchmarks" / "results" / "lowbit_study.json",
        )


if __name__ == "__main__":
    main()
