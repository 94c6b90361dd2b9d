"""The ``gaqat`` command: parsing, printing and exit codes; the work happens elsewhere.

Every subcommand is an ``_add_<name>`` function declaring its options and a
``_<name>(args) -> int`` handler that calls the library and prints. Exit status: 0 on
success, 1 for a failure at run time, 2 for a usage error (bad arguments: nothing was
started), 130 when interrupted (Ctrl-C or SIGTERM; the message says how to resume).
``--debug`` shows the traceback of any error; an unexpected one always shows it.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gaqat import __version__
from gaqat.errors import UsageError, as_usage_errors
from gaqat.hparams import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range
from gaqat.names import ALGORITHMS, BITS_RANGE, DATASETS, PRECISIONS

DATASET_HELP = (
    f"{', '.join(DATASETS)}, or a folder in DomainBed's layout ROOT/<domain>/<class>/<image>"
)
DATA_DIR_HELP = (
    "dataset root (digits: cache folder; named datasets: the folder holding e.g. "
    "PACS/); default $GAQAT_DATA or ~/.cache/gaqat"
)
CLASS_MAP_HELP = (
    "JSON file {domain: {folder name: class}} for image folders whose domains name their "
    "class folders differently (unnamed folders keep their name)"
)


class _Formatter(argparse.HelpFormatter):
    """Shows an option's default when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if (
            flag
            or not action.option_strings
            or "default" in text
            or default is None
            or default is argparse.SUPPRESS
            or default in ([], {})
        ):
            return text
        return f"{text} (default: %(default)s)"


def _json_object(text: str) -> dict:
    """--hparams: a JSON object, with a message that says so when it is not one."""

    def once(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice in {text!r}")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=once)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"lr\": 1e-4}}', got {text!r}"
        )
    return value


@contextmanager
def _plain_warnings(command: str, quiet: bool) -> Iterator[None]:
    """Every warning as one line, ``gaqat train: warning: ...``, printed when it is raised,
    instead of Python's ``FILE:LINE: UserWarning: ...`` with a line of source. ``quiet``
    leaves out UserWarnings (notes such as a torn last line), not the warnings that ask
    for action. Python's -W options and PYTHONWARNINGS keep their say over which show."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not (quiet and issubclass(category, UserWarning)):
            print(f"{command}: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("default")  # once per place and message
        warnings.showwarning = show
        yield


def _subparser(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str,
    handler: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or status lines; results and errors only",
    )
    common.add_argument("--debug", action="store_true", help="show the traceback of any error")
    parser = sub.add_parser(
        name, help=help, description=description, parents=[common], formatter_class=_Formatter
    )
    parser.set_defaults(func=handler, resume_hint=None)
    return parser


# --- data -------------------------------------------------------------------------------


def _add_data(sub: argparse._SubParsersAction) -> None:
    """``gaqat data build|info|preview|download``."""
    data = sub.add_parser(
        "data", help="build, inspect, preview or download datasets", formatter_class=_Formatter
    )
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    specs = {
        "build": ("build the offline DigitsDG benchmark into the data directory", "digits"),
        "info": (
            "domains, classes and images per domain and class; undecodable images",
            DATASET_HELP,
        ),
        "preview": ("write a PNG grid of samples per domain", DATASET_HELP),
        "download": (
            "download a real dataset into DomainBed's layout",
            ", ".join(d for d in DATASETS if d != "digits"),
        ),
    }
    for action, (help_text, name_help) in specs.items():
        p = _subparser(actions, action, help_text, help_text, _data)
        p.add_argument("name", help=name_help)
        p.add_argument(
            "--root",
            "--data-dir",
            type=_folder,
            dest="root",
            required=action == "download",
            help=DATA_DIR_HELP,
        )
        if action in ("info", "preview"):
            p.add_argument("--class-map", type=_file, help=CLASS_MAP_HELP)
        if action == "info":
            p.add_argument(
                "--quick",
                action="store_true",
                help="count files by their headers only, without decoding every image",
            )
        if action == "preview":
            p.add_argument("--out", type=_png, required=True, help="PNG file to write")
            p.add_argument(
                "--per-domain",
                type=_number(int, AT_LEAST_ONE),
                default=10,
                help="samples per domain",
            )
            p.add_argument(
                "--seed", type=_number(int, NON_NEGATIVE), default=0, help="which samples"
            )
        if action == "download":
            p.add_argument(
                "--keep-archives",
                action="store_true",
                help="keep the downloaded archives under ROOT/_downloads",
            )


def _data(args: argparse.Namespace) -> int:
    from gaqat.data import commands  # lazy: keeps `gaqat --help` free of torch

    return getattr(commands, args.action)(args)


# --- train and demo ---------------------------------------------------------------------


class _Once(argparse._StoreAction):
    """An option given twice is a usage error, not "the last one wins": ``--seeds 0
    --seeds 1`` reads as both seeds to some users and as a correction to others, and
    either guess silently runs another sweep than the one meant."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string} given more than once: give it once, with all its values")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


def _options_once(p: argparse.ArgumentParser) -> None:
    """Every plain option declared on ``p`` after this call may be given once."""
    p.register("action", None, _Once)


def _nonempty(text: str, what: str) -> Path:
    """An empty string (an unset shell variable) would mean the current folder, among the
    user's own files."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected {what}, got an empty path")
    return Path(text)


def _path(text: str) -> Path:
    """A folder to read or write, not empty."""
    return _nonempty(text, "a folder")


def _folder(text: str) -> Path:
    """A folder, new or existing, not empty (:func:`_path`); a file is no folder."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a folder")
    return path


def _file(text: str) -> Path:
    """A file, not empty, not a folder."""
    path = _nonempty(text, "a file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file")
    return path


def _png(text: str) -> Path:
    """An image file to write: a name ending in .png, not a folder."""
    path = _file(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text}: expected a file name ending in .png")
    return path


def _number(kind: type, valid: Range) -> Callable[[str], int | float]:
    """An argparse type: a ``kind`` (int or float) within ``valid``, the registry's own
    :class:`~gaqat.hparams.Range`, so an option's bound reads as a hyperparameter's."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value not in valid:
            raise argparse.ArgumentTypeError(f"expected {valid.describe(kind)}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of one run that a sweep hands to every run alike."""
    p.add_argument("--data-dir", type=_folder, help=DATA_DIR_HELP)
    p.add_argument("--class-map", type=_file, help=CLASS_MAP_HELP)
    p.add_argument(
        "--steps",
        type=int,
        help="training steps (default: the dataset's: 1000 "
        "digits, 5000 PACS/VLCS/OfficeHome/TerraIncognita, 15000 DomainNet)",
    )
    p.add_argument(
        "--checkpoint-freq",
        type=int,
        help="steps between evaluations and checkpoints (default: the dataset's)",
    )
    p.add_argument(
        "--hparams",
        type=_json_object,
        default={},
        help="JSON object of hyperparameter overrides, e.g. '{\"lr\": 1e-4}'",
    )
    p.add_argument(
        "--weights",
        default="default",
        help="ResNet start: imagenet, none, or a state_dict file; default: imagenet "
        "for float ResNets, none when --init is given",
    )
    p.add_argument(
        "--image-size", type=int, help="input side in pixels (default: 224 photos, 32 digits)"
    )
    p.add_argument("--num-workers", type=int, default=0, help="data loading processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="PyTorch's deterministic algorithms and cuDNN settings (slower on GPUs)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: bfloat16 autocast of the forward passes (weights and optimizer stay fp32)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="NHWC memory layout for images and convolutions (faster on GPUs)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training passes (the first step traces and builds "
        "kernels: seconds to minutes)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (--quiet implies it)",
    )


def _run_options(args: argparse.Namespace) -> dict:
    return {
        "data_dir": args.data_dir,
        "class_map": args.class_map,
        "steps": args.steps,
        "checkpoint_freq": args.checkpoint_freq,
        "hparams": args.hparams,
        "weights": None if args.weights == "none" else args.weights,
        "image_size": args.image_size,
        "num_workers": args.num_workers,
        "device": args.device,
        "deterministic": args.deterministic,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "progress": args.progress and not args.quiet,
    }


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``gaqat train``."""
    p = _subparser(
        sub,
        "train",
        "train one run under the DomainBed protocol",
        "Train one (algorithm, bit width, held-out domains, seed) run into a run "
        "folder: results.jsonl (DomainBed's records), gradients.jsonl, "
        "checkpoint.pt, done.",
        _train,
    )
    _options_once(p)
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument(
        "--test-envs",
        type=int,
        nargs="+",
        required=True,
        metavar="I",
        help="indices of the held-out domains",
    )
    p.add_argument("--algorithm", default="erm", choices=ALGORITHMS, help="the method")
    p.add_argument(
        "--bits",
        type=int,
        help=f"weight and activation bit width of QAT methods ({BITS_RANGE[0]}..{BITS_RANGE[1]})",
    )
    p.add_argument("--output", type=_path, required=True, help="run folder")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        dest="trial_seed",
        help="trial seed: data split and training randomness",
    )
    p.add_argument("--hparams-seed", type=int, default=0, help="0: defaults; else a random draw")
    p.add_argument(
        "--init",
        type=Path,
        help="float checkpoint that QAT starts from (the checkpoint.pt of an erm run)",
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="QAT of a randomly initialised network, without --init",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run (kept until the new run writes its first checkpoint)",
    )
    p.add_argument(
        "--new-lr",
        type=float,
        help="with --resume: continue at this base learning rate (e.g. after the loss became NaN)",
    )
    _add_run_options(p)
    p.set_defaults(resume_hint=_train_resume_hint)


def _train_resume_hint(argv: list[str], kept: str | None = None) -> str:
    """The command that goes on from what a stopped run left (``RunInterrupted.kept``):
    its checkpoint, the run it was overwriting, nothing; None: stopped before the run
    started, nothing was touched."""
    plain = [a for a in argv if a not in ("--overwrite", "--resume")]
    if kept == "checkpoint":
        return f"continue with: gaqat {shlex.join([*plain, '--resume'])}"
    if kept == "previous":
        return f"to replace it, start again with: gaqat {shlex.join([*plain, '--overwrite'])}"
    if kept == "nothing":
        return f"start again with: gaqat {shlex.join(plain)}"
    return f"nothing was changed; run the same command again: gaqat {shlex.join(argv)}"


def _train(args: argparse.Namespace) -> int:
    from gaqat.distributed import world_from_environment
    from gaqat.runfolder import CHECKPOINT, DONE, RESULTS, run_state
    from gaqat.train import RunInterrupted, TrainConfig, run, run_summary

    config = TrainConfig(
        dataset=args.dataset,
        output=args.output,
        test_envs=tuple(args.test_envs),
        algorithm=args.algorithm,
        bits=args.bits,
        trial_seed=args.trial_seed,
        hparams_seed=args.hparams_seed,
        init=args.init,
        from_scratch=args.from_scratch,
        resume=args.resume,
        overwrite=args.overwrite,
        new_lr=args.new_lr,
        **_run_options(args),
    )
    if args.resume and run_state(args.output) == "new":
        raise UsageError(
            f"--resume: {args.output} holds no run to continue (no {RESULTS}, "
            f"{CHECKPOINT} or {DONE}); check the folder, or leave out --resume to start "
            f"a new run there"
        )
    try:
        out = run(config)
    except RunInterrupted as stop:  # the advice depends on what the run kept
        args.resume_hint = functools.partial(_train_resume_hint, kept=stop.kept)
        raise
    if world_from_environment().main:  # under torchrun, one summary
        print(run_summary(out))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """``gaqat demo``."""
    p = _subparser(
        sub,
        "demo",
        "the embedded default job: DigitsDG, float -> b-bit lsq_sagm "
        "and gaqat, report on the held-out domain",
        "Build DigitsDG, train a float model with mnist_m held out, start lsq_sagm "
        "and gaqat from it, print the report. Finished runs are kept, interrupted "
        "ones resumed.",
        _demo,
    )
    _options_once(p)
    p.add_argument("--output", type=_path, default=Path("runs/demo"), help="folder of the runs")
    p.add_argument("--data-dir", type=_folder, help=DATA_DIR_HELP)
    p.add_argument(
        "--bits",
        type=int,
        default=4,
        metavar="B",
        help=f"QAT bit width ({BITS_RANGE[0]}..{BITS_RANGE[1]})",
    )
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already finished")
    p.set_defaults(resume_hint=lambda argv: "run the same command again to resume")


def _demo(args: argparse.Namespace) -> int:
    from gaqat.demo import demo

    print(
        demo(
            args.output,
            data_dir=args.data_dir,
            bits=args.bits,
            overwrite=args.overwrite,
            progress=not args.quiet,
            note=(lambda _: None) if args.quiet else print,
        )
    )
    return 0


# --- sweep ------------------------------------------------------------------------------


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    """``gaqat sweep``."""
    p = _subparser(
        sub,
        "sweep",
        "launch or resume a DomainBed-style sweep of runs",
        "One run per (algorithm, bits, held-out domain, trial seed, hparams seed), each in "
        "OUTPUT/<name>_<hash of its arguments>: launching the same sweep again skips finished "
        "runs, resumes unfinished ones and leaves runs another process holds to it. QAT runs "
        "start from the erm run of their held-out domain and seed (added if not asked for), "
        "so methods are compared in pairs. Prints the report at the end.",
        _sweep,
    )
    _options_once(p)
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument(
        "--algorithms",
        nargs="+",
        required=True,
        choices=ALGORITHMS,
        metavar="NAME",
        help=f"the methods: {', '.join(ALGORITHMS)}",
    )
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="bit widths of QAT methods")
    p.add_argument(
        "--test-envs",
        nargs="+",
        default=["all"],
        metavar="I",
        help="held-out domains, one per run: 'all' or indices",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="trial seeds")
    p.add_argument(
        "--hparams-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="0: defaults; else random-search draws",
    )
    p.add_argument("--output", type=_path, required=True, help="sweep folder")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their state only")
    p.add_argument(
        "--skip-failed",
        action="store_true",
        help="go on after a failed run (runs starting from it are skipped)",
    )
    p.add_argument(
        "--float-steps",
        type=_number(int, AT_LEAST_ONE),
        help="training steps of the float runs (erm, sagm), which QAT starts from "
        "(default: --steps)",
    )
    p.add_argument(
        "--float-checkpoint-freq",
        type=_number(int, AT_LEAST_ONE),
        help="steps between evaluations of the float runs (default: --checkpoint-freq)",
    )
    _add_sweep_scale_options(p.add_argument_group("where the runs execute"))
    _add_run_options(p)
    p.set_defaults(resume_hint=lambda argv: "launch the same sweep again to resume")


def _add_sweep_scale_options(scale: argparse._ArgumentGroup) -> None:
    """``gaqat sweep``'s options for where its runs execute: here or on SLURM."""
    scale.add_argument(
        "--jobs",
        type=_number(int, AT_LEAST_ONE),
        default=1,
        help="runs at once: worker processes on this machine (CPU threads split "
        "between them, one GPU each where there are GPUs), or jobs queued "
        "at once on SLURM",
    )
    scale.add_argument(
        "--threads",
        type=_number(int, AT_LEAST_ONE),
        help="CPU threads of each run (default: all for --jobs 1, else split between the "
        "jobs); equal threads give bit-identical records whatever --jobs is",
    )
    scale.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help='this machine, or SLURM through submitit (pip install "gaqat[slurm]")',
    )
    scale.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    scale.add_argument(
        "--gpus-per-run",
        type=_number(int, NON_NEGATIVE),
        default=1,
        help="SLURM: GPUs of each run's job (0: a CPU job)",
    )
    scale.add_argument(
        "--cpus-per-run",
        type=_number(int, AT_LEAST_ONE),
        default=8,
        help="SLURM: CPUs of each run's job",
    )
    scale.add_argument(
        "--mem-gb",
        type=_number(float, POSITIVE),
        default=32,
        help="SLURM: memory of each run's job",
    )
    scale.add_argument(
        "--time-min",
        type=_number(int, AT_LEAST_ONE),
        default=24 * 60,
        help="SLURM: time limit of each run's job, in minutes (a run that hits "
        "it resumes from its last checkpoint when the sweep is launched again)",
    )


def _launcher(args: argparse.Namespace):
    from gaqat import launchers

    if args.launcher == "slurm":
        options = launchers.SlurmOptions(
            partition=args.partition,
            gpus=args.gpus_per_run,
            cpus=args.cpus_per_run,
            mem_gb=args.mem_gb,
            time_min=args.time_min,
        )
        return launchers.SubmititLauncher(args.output / ".submitit", args.jobs, options)
    if args.jobs > 1:
        return launchers.ProcessLauncher(args.jobs, args.threads)
    return launchers.InlineLauncher(args.threads)


def _sweep(args: argparse.Namespace) -> int:
    from gaqat import sweep
    from gaqat.report import report

    config = sweep.SweepConfig(
        dataset=args.dataset,
        output=args.output,
        algorithms=args.algorithms,
        test_envs=args.test_envs,
        bits=args.bits,
        seeds=args.seeds,
        hparams_seeds=args.hparams_seeds,
        options=_run_options(args),
        float_options={
            k: v
            for k, v in (
                ("steps", args.float_steps),
                ("checkpoint_freq", args.float_checkpoint_freq),
            )
            if v is not None
        },
    )
    with as_usage_errors():
        jobs = sweep.plan(config)  # every job's arguments checked before the first one runs
    print(sweep.table(jobs), flush=True)
    if args.dry_run:
        return 0
    sweep.save_record(config, jobs)
    note = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    outcomes = sweep.launch(jobs, launcher=_launcher(args), skip_failed=args.skip_failed, note=note)
    if any(o.status in ("kept", "ran") for o in outcomes):
        print(report([args.output], selection="all"))
    unfinished = [o for o in outcomes if o.status in ("failed", "skipped", "busy")]
    not_started = len(jobs) - len(outcomes)
    if unfinished or not_started:
        stopped = (
            f", {not_started} not started (--skip-failed goes on past a failure)"
            if not_started
            else ""
        )
        print(
            f"gaqat sweep: {len(unfinished)} job(s) failed, busy or skipped{stopped}; "
            f"launching the same sweep again retries them",
            file=sys.stderr,
        )
        return 1
    return 0


# --- report, plot, export ---------------------------------------------------------------


def _add_report(sub: argparse._SubParsersAction) -> None:
    """``gaqat report``."""
    from gaqat import report

    p = _subparser(
        sub,
        "report",
        "per-domain accuracy tables (mean ± standard error over trial seeds)",
        "Read every results.jsonl below the folders and print, per dataset, algorithm and bit "
        "width, the test-domain accuracies under a model selection method (the oracle is "
        "labelled as such); with --paired, the paired differences to a baseline algorithm "
        "instead.",
        _report,
    )
    p.add_argument(
        "dirs", nargs="+", type=_path, metavar="DIR", help="folders searched recursively"
    )
    p.add_argument("--format", choices=report.FORMATS, default="markdown", help="output format")
    p.add_argument(
        "--selection",
        choices=report.SELECTIONS,
        default="training",
        help="training-domain validation, leave-one-domain-out cross-validation, "
        "test-domain oracle, or all three",
    )
    p.add_argument(
        "--paired",
        metavar="BASELINE",
        help="instead of accuracies, per-pair differences to this algorithm "
        "(e.g. lsq_sagm): runs sharing test domains, trial and hparams seed; "
        "mean ± standard error (ddof=1), wins/ties/losses",
    )


def _report(args: argparse.Namespace) -> int:
    from gaqat import report

    with as_usage_errors():
        text = report.report(args.dirs, args.format, args.selection, args.paired)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    """``gaqat plot``."""
    p = _subparser(
        sub,
        "plot",
        "the paper's figures from a gaqat run's gradients.jsonl",
        "Write cumulative.png (task vs smoothness gradient per window, Figures 2/5), "
        "disorder.png (D_task and D_smooth per layer and window, Figure 3) and freezing.png "
        "(freeze timeline, Figure 4).",
        _plot,
    )
    p.add_argument("run_dir", type=Path, help="folder of a `gaqat train --algorithm gaqat` run")
    p.add_argument("--out", type=_path, help="folder for the PNGs (default: the run folder)")
    p.add_argument(
        "--tau", type=float, help="freezing threshold to draw, in [0, 1] (default: the run's)"
    )


def _plot(args: argparse.Namespace) -> int:
    from gaqat.plots import plot_run  # lazy: keeps `gaqat --help` free of matplotlib
    from gaqat.runfolder import file_in_the_way

    if args.out is not None:  # a folder, or one to create: not a file or below one
        file = file_in_the_way(args.out)
        if file is not None:
            raise UsageError(f"--out {args.out}: {file} is a file, expected a folder for the PNGs")
    with as_usage_errors():
        paths = plot_run(args.run_dir, args.out, args.tau)
    print("\n".join(map(str, paths)))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``gaqat export``."""
    p = _subparser(
        sub,
        "export",
        "write a QAT checkpoint as integer codes (safetensors) or ONNX QDQ",
        "int: b-bit weight codes as int8, step sizes, float remainder and metadata in one "
        "safetensors file. onnx: QuantizeLinear/DequantizeLinear around every quantized "
        "layer's weight and input, checked with ONNX Runtime; with --evaluate, also the "
        "file's accuracy on every split of its run beside PyTorch's.",
        _export,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt of a quantized run")
    p.add_argument("--format", choices=("int", "onnx"), required=True, help="file format")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (and its .eval.json), once the new one is complete; "
        "a run's own files are never replaced",
    )
    p.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold batch norm into the float convolutions before it (not into "
        "quantized ones: that would change their integer weights)",
    )
    p.add_argument(
        "--input-size",
        type=int,
        help="image side for tracing and the probe check "
        "(default: 32 for small_cnn, 224 for the ImageNet backbones)",
    )
    p.add_argument(
        "--int4-weights",
        action="store_true",
        help="onnx: store 4-bit and 3-bit weight codes as packed INT4 (opset 21) instead of "
        "int8: the same integers in half the bytes; onnxruntime dequantizes them to float "
        "on every run (slower than float, and no integer kernel fuses)",
    )
    p.add_argument(
        "--integer-kernels",
        action="store_true",
        help="onnx: fold batch norm into the quantized convolutions' per-channel weight "
        "scales (codes unchanged), so that onnxruntime runs them as QLinearConv",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="onnx: run the written file under onnxruntime on every split of the run's "
        "dataset (its trial seed and holdout) and print its accuracy beside PyTorch's "
        "and their top-1 agreement; also written to <out>.eval.json",
    )
    p.add_argument(
        "--data-dir",
        type=_folder,
        help="with --evaluate: the data directory (default: the run's, else $GAQAT_DATA "
        "or ~/.cache/gaqat)",
    )


def _export(args: argparse.Namespace) -> int:
    from gaqat.export import export_checkpoint

    with as_usage_errors():  # what is wrong is the checkpoint or an option given
        summary = export_checkpoint(
            args.checkpoint,
            args.format,
            args.out,
            fold_bn=args.fold_bn,
            input_size=args.input_size,
            int4_weights=args.int4_weights,
            integer_kernels=args.integer_kernels,
            evaluate=args.evaluate,
            data_dir=args.data_dir,
            overwrite=args.overwrite,
        )
    print(summary)
    return 0


# --- corrupt ----------------------------------------------------------------------------


def _add_corrupt(sub: argparse._SubParsersAction) -> None:
    """``gaqat corrupt``."""
    p = _subparser(
        sub,
        "corrupt",
        "accuracy of runs on ImageNet-C-style corrupted copies of their evaluation images",
        "Evaluate each run's last checkpoint on its held-out domains and training-domain "
        "validation splits, clean and under ImageNet-C's corruptions at severities 1-5 "
        "(each image under its own seed), write corruptions.jsonl into the run folder "
        "(re-used by a later call) and print a table; with --baseline, the mean "
        "corruption error (mCE) and relative mCE against that run. Runs that share their "
        "images share the corruption work.",
        _corrupt,
    )
    _options_once(p)
    p.add_argument("runs", nargs="+", type=_path, metavar="RUN", help="run folders")
    p.add_argument(
        "--baseline", type=_path, metavar="RUN", help="run the mCE is relative to (evaluated too)"
    )
    p.add_argument(
        "--corruptions",
        nargs="+",
        default=["benchmark"],
        metavar="SPEC",
        help="benchmark (ImageNet-C's 15), extra (its 4 held-out ones), all, a group "
        "(noise, blur, weather, digital) or corruption names",
    )
    p.add_argument(
        "--severities",
        nargs="+",
        type=_number(int, Range(1, 5)),
        default=[1, 2, 3, 4, 5],
        metavar="S",
        help="severities from 1 to 5",
    )
    p.add_argument(
        "--per-domain",
        type=_number(int, NON_NEGATIVE),
        default=1000,
        help="images of each held-out domain and validation split, spread over it (0: all)",
    )
    p.add_argument("--data-dir", type=_folder, help=DATA_DIR_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--figure", type=_png, help="PNG of accuracy against severity per corruption")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="evaluate again a run whose corruptions.jsonl has other settings",
    )
    p.add_argument(
        "--per-corruption",
        action="store_true",
        help="also print each run's accuracy per corruption and severity",
    )
    p.set_defaults(
        resume_hint=lambda argv: (
            "each run's file is written whole or not at all: the same "
            "command again re-uses the runs already written"
        )
    )


def _corrupt(args: argparse.Namespace) -> int:
    from gaqat import corruptions  # lazy: keeps `gaqat --help` free of torch
    from gaqat.runfolder import file_in_the_way

    names = corruptions.corruption_names(args.corruptions)
    blocker = None if args.figure is None else file_in_the_way(args.figure.parent)
    if blocker is not None:
        raise UsageError(f"--figure {args.figure}: {blocker} is a file, expected a folder")
    results = corruptions.evaluate_corruptions(
        args.runs,
        names,
        args.severities,
        args.per_domain,
        data_dir=args.data_dir,
        device=args.device,
        overwrite=args.overwrite,
        baseline=args.baseline,
        progress=not args.quiet,
    )
    print(corruptions.corruption_table(results, args.baseline, args.per_corruption))
    if args.figure is not None:
        print(corruptions.plot_corruptions(results, args.figure))
    return 0


# --- ensemble ---------------------------------------------------------------------------


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    """``gaqat ensemble``."""
    p = _subparser(
        sub,
        "ensemble",
        "evaluate runs that differ only by trial seed as one ensemble (mean of softmax)",
        "Load the final models of finished runs that differ only by trial seed (same "
        "dataset, held-out domains, algorithm, bits, hyperparameters), evaluate the mean of "
        "their softmax outputs on every split of their runs, and write an ensemble folder "
        "(results.jsonl with one record, named e.g. ens5_lsq_w4, done) that `gaqat report` "
        "shows as a row under every selection method. Prints the accuracy per split beside "
        "the members' and the ensemble's size against one float model.",
        _ensemble,
    )
    _options_once(p)
    p.add_argument(
        "runs",
        nargs="+",
        type=_path,
        metavar="RUN",
        help="the members' run folders (with --sweep: folders searched for runs)",
    )
    p.add_argument(
        "--output",
        type=_path,
        required=True,
        help="the ensemble's folder (with --sweep: the folder that receives one folder per "
        "ensemble, e.g. the sweep's own)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="group the finished runs below RUN by everything but their trial seed: one "
        "ensemble per group of two or more (one kept when its folder has the same members)",
    )
    p.add_argument(
        "--algorithms",
        nargs="+",
        choices=ALGORITHMS,
        metavar="NAME",
        help="with --sweep: only runs of these methods (default: all)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write the K quantized members and their averaging as one ONNX file "
        "(ensemble.onnx), checked and evaluated on every split under ONNX Runtime "
        "(ensemble.eval.json)",
    )
    p.add_argument(
        "--int4-weights",
        action="store_true",
        help="with --onnx: 4-bit and 3-bit weight codes as packed INT4 (gaqat export's option)",
    )
    p.add_argument(
        "--integer-kernels",
        action="store_true",
        help="with --onnx: batch norm folded into the quantized convolutions' scales, "
        "for onnxruntime's QLinearConv (gaqat export's option)",
    )
    p.add_argument("--data-dir", type=_folder, help="the runs' data (default: where they found it)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an ensemble the output folder holds"
    )
    p.set_defaults(
        resume_hint=lambda argv: (
            "an ensemble's files are written once it is evaluated: the "
            "same command again starts it over (with --sweep, the ensembles written are kept)"
        )
    )


def _ensemble(args: argparse.Namespace) -> int:
    from gaqat import ensemble  # lazy: keeps `gaqat --help` free of torch

    for option, given, needs, needed in (
        ("--algorithms", args.algorithms, "--sweep", args.sweep),
        ("--int4-weights", args.int4_weights, "--onnx", args.onnx),
        ("--integer-kernels", args.integer_kernels, "--onnx", args.onnx),
    ):
        if given and not needed:
            raise UsageError(f"{option} goes with {needs}, which was not given")
    options = {
        "data_dir": args.data_dir,
        "device": args.device,
        "overwrite": args.overwrite,
        "onnx": args.onnx,
        "int4_weights": args.int4_weights,
        "integer_kernels": args.integer_kernels,
        "progress": not args.quiet,
    }
    if args.sweep:
        results, notes = ensemble.build_sweep_ensembles(
            args.runs, args.output, args.algorithms, **options
        )
        for note in notes:
            print(f"gaqat ensemble: {note}", file=sys.stderr)
    else:
        results = [ensemble.build_ensemble(args.runs, args.output, **options)]
    print("\n\n".join(map(str, results)))
    return 0


# --- the command ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaqat",
        formatter_class=_Formatter,
        description="Low-bit quantization-aware training for domain generalization: "
        "LSQ + SAGM + disorder-guided freezing (GAQAT).",
    )
    parser.add_argument("--version", action="version", version=f"gaqat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_data,
        _add_train,
        _add_demo,
        _add_sweep,
        _add_report,
        _add_plot,
        _add_export,
        _add_corrupt,
        _add_ensemble,
    ):
        add(sub)
    return parser


# The optional dependencies and the extra that brings each (pyproject.toml).
EXTRAS = {
    "mlxtend": "digits",
    "sklearn": "digits",
    "skimage": "digits",
    "matplotlib": "plot",
    "safetensors": "export",
    "onnx": "export",
    "onnxruntime": "export",
}


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    name = " ".join(["gaqat", args.command, *([args.action] if "action" in args else [])])
    from gaqat.launchers import sigterm_as_interrupt  # torch's import: not for --help

    try:
        with sigterm_as_interrupt(), _plain_warnings(name, args.quiet):
            return int(args.func(args) or 0)
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if args.debug or top not in EXTRAS:
            raise
        print(
            f"{name}: error: this needs {top}, which is not installed; it comes with "
            f'gaqat\'s extra: pip install "gaqat[{EXTRAS[top]}]"',
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as error:
        hint = args.resume_hint(argv) if args.resume_hint else ""
        print(f"{name}: {str(error) or 'interrupted.'} {hint}".rstrip(), file=sys.stderr)
        return 130
    except (UsageError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"{name}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"{name}: error: {_describe(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
