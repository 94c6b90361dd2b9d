"""Training throughput on one device: images per second and peak memory per method.

ResNet-50 at 224x224 with PACS's shape of a step (3 training domains x 32 images), erm
(float) against lsq, lsq_sagm and gaqat at 4 bits, in fp32 and in bf16 autocast
(``--precision``), ``--channels-last`` and ``--compile`` (torch.compile) optional. One step is
``gaqat.algorithms.Algorithm.update`` on random images already on the device, so the
numbers measure the training step, not the input pipeline. Goals (issue "Scale"): gaqat
>= 0.45x float erm's images/s (two passes make 0.5 the ceiling), W4A4 lsq >= 0.8x.

    python benchmarks/gpu_throughput.py [--quick] [--device cuda] [--rounds 20]

``--quick`` is a CPU smoke run (the small CNN at 32x32, 4 images per domain). The JSON
goes to ``benchmarks/results/gpu_throughput.json`` (``gpu_throughput_quick.json``).
"""

from __future__ import annotations

import statistics

import torch
from step_cost import candidates
from timing import (
    benchmark_parser,
    parse_benchmark_args,
    peak_memory_mb,
    print_table,
    time_interleaved,
    write_json,
)

from gaqat.models import ModelConfig
from gaqat.names import PRECISIONS

DOMAINS, PER_DOMAIN = 3, 32
CASES = {  # name: (model config, image size, images per domain)
    "resnet50": (ModelConfig(arch="resnet50", num_classes=7), 224, PER_DOMAIN),
    "small_cnn": (ModelConfig(num_classes=7), 224, PER_DOMAIN),
}
QUICK_CASE = (ModelConfig(num_classes=7), 32, 4)
METHODS = ("erm", "lsq", "lsq_sagm", "gaqat")
GOALS = {"gaqat": 0.45, "lsq": 0.8}  # images/s as a fraction of float erm's


def peak_memory(step, device: torch.device) -> float | None:
    """Peak device memory (MiB) of one step on its own; None on CPU, where only the
    process's high-water mark exists."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return peak_memory_mb(device)


def measure(case, device, precision, layout: dict, rounds, warmup, label) -> list[dict]:
    """``layout``: the Algorithm options channels_last and compile."""
    steps = candidates(
        case, device, window=50, methods=METHODS, domains=DOMAINS, precision=precision, **layout
    )
    timings = time_interleaved(steps, rounds=rounds, warmup=warmup, device=device)
    images = DOMAINS * case[2]
    per_second = {n: images * 1000 / statistics.median(t.times_ms) for n, t in timings.items()}
    return [
        {
            "case": label,
            "precision": precision,
            "method": name,
            "images_per_s": rate,
            "vs_erm": rate / per_second["erm"],
            "goal": GOALS.get(name),
            "meets_goal": rate / per_second["erm"] >= GOALS[name] if name in GOALS else None,
            "peak_mb": peak_memory(steps[name], device),
        }
        for name, rate in per_second.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], CASES, rounds=20, warmup=3)
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the steps")
    args = parse_benchmark_args(parser, argv)
    layout = {"channels_last": args.channels_last, "compile": args.compile}
    device = torch.device(args.device)
    cases = {"small_cnn_32px": QUICK_CASE} if args.quick else {c: CASES[c] for c in args.cases}
    rounds, warmup = (3, 1) if args.quick else (args.rounds, args.warmup)
    rows = [
        row
        for label, case in cases.items()
        for precision in args.precision
        for row in measure(case, device, precision, layout, rounds, warmup, label)
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print_table(rows, title=f"training throughput on {name} ({device}), {rounds} rounds")
    path = write_json(
        "gpu_throughput_quick" if args.quick else "gpu_throughput",
        {
            "step": "gaqat.algorithms.Algorithm.update",
            "domains": DOMAINS,
            **layout,
            "rounds": rounds,
            "goals": GOALS,
            "rows": rows,
        },
        device,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
