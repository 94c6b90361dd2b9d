"""DigitsDG accuracy of LSQ with and without batch norm folded into the quantized convolutions.

    python benchmarks/bn_folding.py run STUDY [--bits 4 3] [--seeds 0 1 2] [--jobs 2 --threads 1]
    python benchmarks/bn_folding.py table STUDY

``run`` trains, into ``STUDY/bn_folding``, ``lsq`` with ``fold_batch_norm`` on, from the
float runs of the DigitsDG study's main grid (``benchmarks/digits_study.py run STUDY``) and
with its scale (300 QAT steps, every held-out domain). The unfolded arm is that grid's own
``lsq`` runs: the same arguments but the override, so the same init, seed and batches.
``table`` pairs the two arms per (held-out domain, seed, bit width) under training-domain
validation, prints per-domain accuracies side by side and the mean paired difference,
and writes ``benchmarks/results/bn_folding.json``. Idempotent, as the study.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from digits_study import DOMAINS, FULL, _sweep, link_shared
from timing import print_table, write_json

from gaqat.launchers import InlineLauncher, ProcessLauncher
from gaqat.report.runs import load_run
from gaqat.report.table import Difference
from gaqat.runfolder import DONE, RESULTS
from gaqat.selection import SELECTION_METHODS
from gaqat.sweep import launch, plan

FOLDED = {"fold_batch_norm": "on"}


def _arms(study: Path, bits: tuple[int, ...], seeds: tuple[int, ...]):
    """The folded sweep and the main grid's sweep of the same lsq runs."""
    kwargs = {"bits": bits, "seeds": seeds}
    folded = _sweep(study / "bn_folding", FULL, ("erm", "lsq"), hparams=FOLDED, **kwargs)
    unfolded = _sweep(study / "main", FULL, ("erm", "lsq"), **kwargs)
    return folded, unfolded


def run(study: Path, bits, seeds, jobs: int, threads: int | None) -> None:
    folded, _ = _arms(study, bits, seeds)
    planned = plan(folded)
    link_shared(planned, study / "main")  # the float inits
    launcher = ProcessLauncher(jobs, threads) if jobs > 1 else InlineLauncher(threads)
    outcomes = launch(planned, launcher=launcher, note=lambda line: print(line, flush=True))
    if any(o.status not in ("kept", "ran") for o in outcomes) or len(outcomes) < len(planned):
        sys.exit("some runs failed or were skipped; launch again to retry them")


def _selected(folder: Path) -> float | None:
    """Held-out accuracy (percent) at the checkpoint training-domain validation picks."""
    if not (folder / DONE).exists():
        return None
    loaded = load_run(folder / RESULTS)
    return (
        None if loaded is None else 100 * SELECTION_METHODS["training"].run_acc(loaded.records)[1]
    )


def table(study: Path, bits, seeds) -> None:
    arms = [
        {
            (j.key["test_envs"][0], j.key["trial_seed"], j.key.get("bits")): j.folder
            for j in plan(config)
            if j.key["algorithm"] == "lsq"
        }
        for config in _arms(study, bits, seeds)
    ]
    rows = []
    for (env, seed, b), folder in sorted(arms[0].items()):
        acc = _selected(folder), _selected(arms[1][env, seed, b])
        if None in acc:
            continue
        rows.append(
            {
                "bits": b,
                "held_out": DOMAINS[env],
                "seed": seed,
                "folded": acc[0],
                "unfolded": acc[1],
                "difference": acc[0] - acc[1],
            }
        )
    per_domain = [
        {
            "bits": b,
            "held_out": domain,
            "folded": statistics.fmean(r["folded"] for r in group),
            "unfolded": statistics.fmean(r["unfolded"] for r in group),
            "pairs": len(group),
        }
        for b in bits
        for domain in DOMAINS
        if (group := [r for r in rows if r["bits"] == b and r["held_out"] == domain])
    ]
    summary = []
    for b in (*bits, "all"):
        # Difference takes fractions
        diffs = [r["difference"] / 100 for r in rows if b in ("all", r["bits"])]
        if diffs:
            stats = Difference(tuple(diffs), False).stats()
            for key in ("mean_diff", "stderr"):  # percentage points, as strings
                stats[key] = float(stats[key])
            summary.append({"bits": b, **stats})
    print_table(
        per_domain, title="lsq, training-domain validation, held-out accuracy (%), seed mean"
    )
    print()
    print_table(summary, title="folded - unfolded (points), paired per (held-out domain, seed)")
    path = write_json("bn_folding", {"runs": rows, "per_domain": per_domain, "paired": summary})
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("study", type=Path)
    parser.add_argument("--bits", type=int, nargs="+", default=list(FULL.bits))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(FULL.seeds))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    bits, seeds = tuple(args.bits), tuple(args.seeds)
    if args.action == "run":
        run(args.study, bits, seeds, args.jobs, args.threads)
    else:
        table(args.study, bits, seeds)


if __name__ == "__main__":
    main()
