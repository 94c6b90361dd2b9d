"""The ``gaqat`` command: argument parsing only; every command calls one function elsewhere.

Each subcommand has its own ``_add_<name>`` function below, so adding or changing one
command touches one block.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _plain_warnings(command: str) -> Iterator[None]:
    """Warnings (e.g. a torn last line of a killed run) as one plain stderr line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print(f"gaqat {command}: warning: {warning.message}", file=sys.stderr)


def _json_object(text: str) -> dict:
    """--hparams: a JSON object, with a message that says so when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object like \'{{"lr": 1e-4}}\', '
                                         f"got {text!r}")
    return value


def _add_data(sub: argparse._SubParsersAction) -> None:
    """``gaqat data build|info|preview|download``."""

    def run(action: str):
        def call(args: argparse.Namespace) -> int:
            from gaqat.data import commands  # lazy: keeps `gaqat --help` free of torch

            return getattr(commands, action)(args)

        return call

    data = sub.add_parser("data", help="build, inspect, preview or download datasets")
    actions = data.add_subparsers(dest="action", required=True)
    root_help = ("data directory (digits: cache folder; named datasets: the folder holding "
                 "e.g. PACS/); default $GAQAT_DATA or ~/.cache/gaqat")
    names = ("digits, PACS, VLCS, OfficeHome, TerraIncognita, DomainNet, or a folder in "
             "DomainBed's layout")
    specs = {
        "build": ("build the offline DigitsDG benchmark into the data directory", "digits"),
        "info": ("domains, classes and images per domain and class", names),
        "preview": ("write a PNG grid of samples per domain", names),
        "download": ("download a real dataset into the DomainBed layout",
                     "PACS, VLCS, OfficeHome, TerraIncognita or DomainNet"),
    }
    for action, (help_text, name_help) in specs.items():
        p = actions.add_parser(action, help=help_text)
        p.add_argument("name", help=name_help)
        p.add_argument("--root", "--data-dir", type=Path, dest="root",
                       required=action == "download", help=root_help)
        p.set_defaults(func=run(action))
        if action == "preview":
            p.add_argument("--out", type=Path, required=True, help="PNG file to write")
            p.add_argument("--per-domain", type=int, default=10, help="samples per domain")
            p.add_argument("--seed", type=int, default=0, help="which samples")
        if action == "download":
            p.add_argument("--keep-archives", action="store_true",
                           help="keep the downloaded archives under ROOT/_downloads")


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``gaqat train`` and ``gaqat demo``."""
    p = sub.add_parser("train", help="train one run under the DomainBed protocol")
    p.add_argument("--dataset", required=True, help="digits, PACS, VLCS, OfficeHome, "
                   "TerraIncognita, DomainNet, or a folder in DomainBed's layout")
    p.add_argument("--data-dir", type=Path, help="dataset root (digits: cache folder; "
                   "default $GAQAT_DATA or ~/.cache/gaqat)")
    p.add_argument("--test-envs", type=int, nargs="+", required=True, metavar="I",
                   help="indices of the held-out domains")
    p.add_argument("--algorithm", default="erm", help="erm, sagm, lsq, lsq_sam, lsq_sagm, gaqat")
    p.add_argument("--bits", type=int, help="weight and activation bit width of QAT methods")
    p.add_argument("--output", type=Path, required=True, help="run folder")
    p.add_argument("--steps", type=int, help="training steps (default: the dataset's)")
    p.add_argument("--checkpoint-freq", type=int, help="steps between evaluations")
    p.add_argument("--seed", type=int, default=0, dest="trial_seed",
                   help="trial seed: data split and training randomness")
    p.add_argument("--hparams-seed", type=int, default=0, help="0: defaults; else a random draw")
    p.add_argument("--hparams", type=_json_object, default={}, help="JSON object of overrides")
    p.add_argument("--init", type=Path, help="float checkpoint that QAT starts from")
    p.add_argument("--weights", default="default",
                   help="ResNet start: imagenet, none, or a state_dict file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run")
    p.add_argument("--num-workers", type=int, default=0, help="data loading processes")
    p.add_argument("--image-size", type=int, help="input side (default: 224 photos, 32 digits)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="the embedded default job: DigitsDG, float -> 4-bit "
                       "lsq_sagm and gaqat, report on the held-out domain")
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already finished")
    p.set_defaults(func=_demo)


def _train(args: argparse.Namespace) -> None:
    from gaqat.train import TrainConfig, run

    weights = None if args.weights == "none" else args.weights
    run(TrainConfig(dataset=args.dataset, output=args.output, test_envs=tuple(args.test_envs),
                    algorithm=args.algorithm, bits=args.bits, data_dir=args.data_dir,
                    steps=args.steps, checkpoint_freq=args.checkpoint_freq,
                    trial_seed=args.trial_seed, hparams_seed=args.hparams_seed,
                    hparams=args.hparams, init=args.init, weights=weights, resume=args.resume,
                    overwrite=args.overwrite, num_workers=args.num_workers,
                    image_size=args.image_size, device=args.device,
                    progress=args.progress))


def _demo(args: argparse.Namespace) -> None:
    from gaqat.demo import demo

    print(demo(args.output, data_dir=args.data_dir, bits=args.bits, overwrite=args.overwrite))


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    """``gaqat sweep``."""

    def run(args: argparse.Namespace) -> int:
        from gaqat.sweep import main  # lazy: keeps `gaqat --help` free of torch

        return main({k: v for k, v in vars(args).items() if k not in ("func", "command")})

    p = sub.add_parser(
        "sweep", help="launch or resume a DomainBed-style sweep of runs",
        description="One run per (algorithm, bits, held-out domain, trial seed, hparams seed), "
                    "each in OUTPUT/<name>_<hash of its arguments>: launching the same sweep "
                    "again skips finished runs and resumes unfinished ones. QAT runs start "
                    "from the erm run of their held-out domain and seed (added if not asked "
                    "for), so methods are compared in pairs. Prints the report at the end.")
    p.add_argument("--dataset", required=True, help="digits, PACS, VLCS, OfficeHome, "
                   "TerraIncognita, DomainNet, or a folder in DomainBed's layout")
    p.add_argument("--data-dir", type=Path, help="dataset root (as for gaqat train)")
    p.add_argument("--algorithms", nargs="+", required=True, metavar="NAME",
                   help="erm, sagm, lsq, lsq_sam, lsq_sagm, gaqat")
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="bit widths of QAT methods")
    p.add_argument("--test-envs", nargs="+", default=["all"], metavar="I",
                   help="held-out domains, one per run: 'all' (default) or indices")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="trial seeds")
    p.add_argument("--hparams-seeds", type=int, nargs="+", default=[0],
                   help="0: defaults; else random-search draws")
    p.add_argument("--steps", type=int, help="training steps per run (default: the dataset's)")
    p.add_argument("--checkpoint-freq", type=int, help="steps between evaluations")
    p.add_argument("--hparams", type=_json_object, default={},
                   help="JSON object of overrides; each run takes the keys its algorithm has")
    p.add_argument("--output", type=Path, required=True, help="sweep folder")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their state only")
    p.add_argument("--skip-failed", action="store_true",
                   help="go on after a failed run (runs starting from it are skipped)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    """``gaqat report``."""
    from gaqat import report

    def run(args: argparse.Namespace) -> None:
        with _plain_warnings("report"):
            text = report.report(args.dirs, args.format, args.selection, args.paired)
        print(text, end="" if text.endswith("\n") else "\n")

    parser = sub.add_parser(
        "report", help="per-domain accuracy tables (mean ± standard error over trial seeds)",
        description="Read every results.jsonl below the folders and print, per dataset, "
                    "algorithm and bit width, the test-domain accuracies under a model "
                    "selection method (the oracle is labelled as such); with --paired, "
                    "the paired differences to a baseline algorithm instead.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched recursively")
    parser.add_argument("--format", choices=report.FORMATS, default="markdown")
    parser.add_argument("--selection", choices=report.SELECTIONS, default="training",
                        help="training-domain validation (default), test-domain oracle, or both")
    parser.add_argument("--paired", metavar="BASELINE",
                        help="instead of accuracies, per-pair differences to this algorithm "
                             "(e.g. lsq_sagm): runs sharing test domains, trial and hparams "
                             "seed; mean ± standard error (ddof=1), wins/ties/losses")
    parser.set_defaults(func=run)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    """``gaqat plot``."""

    def run(args: argparse.Namespace) -> None:
        from gaqat.plots import plot_run  # lazy: keeps `gaqat --help` free of matplotlib

        with _plain_warnings("plot"):
            paths = plot_run(args.run_dir, args.out, args.tau)
        print("\n".join(map(str, paths)))

    p = sub.add_parser(
        "plot", help="the paper's figures from a gaqat run's gradients.jsonl",
        description="Write cumulative.png (task vs smoothness gradient per window, Figures "
                    "2/5), disorder.png (D_task and D_smooth per layer and window, Figure 3) "
                    "and freezing.png (freeze timeline, Figure 4).")
    p.add_argument("run_dir", type=Path, help="folder of a `gaqat train --algorithm gaqat` run")
    p.add_argument("--out", type=Path, help="folder for the PNGs (default: the run folder)")
    p.add_argument("--tau", type=float, help="freezing threshold to draw (default: the run's)")
    p.set_defaults(func=run)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``gaqat export``."""

    def run(args: argparse.Namespace) -> None:
        from gaqat.export import export_checkpoint

        print(export_checkpoint(args.checkpoint, args.format, args.out, fold_bn=args.fold_bn,
                                input_size=args.input_size))

    p = sub.add_parser(
        "export", help="write a QAT checkpoint as integer codes (safetensors) or ONNX QDQ",
        description="int: b-bit weight codes as int8, step sizes, float remainder and metadata "
                    "in one safetensors file. onnx: QuantizeLinear/DequantizeLinear around every "
                    "quantized layer's weight and input, checked with ONNX Runtime.")
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt of a quantized run")
    p.add_argument("--format", choices=("int", "onnx"), required=True)
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold batch norm into the float convolutions before it (not into "
                        "quantized ones: that would change their integer weights)")
    p.add_argument("--input-size", type=int, help="image side for tracing and the probe "
                   "check (default: 32 for small_cnn, 224 for ResNets)")
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaqat", description="Low-bit quantization-aware training for domain "
        "generalization: LSQ + SAGM + disorder-guided freezing (GAQAT).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_train, _add_sweep, _add_report, _add_plot, _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Bad input and known failure modes: one clear line, no traceback.
        print(f"gaqat {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
