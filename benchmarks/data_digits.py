"""What DigitsDG data costs: building the cache, loading it, training batches, evaluation.

Goal (issue 4): a fresh build in under 30 s on 2 cores. The other rows say whether data
can starve training: a training step of the small CNN is ~90 ms (``step_cost.py``), so
one step's batches (3 source domains x 32, with or without the shift augmentation)
should cost a few ms, and a full evaluation pass over every split well under a second.

    python benchmarks/data_digits.py [--short] [--build-rounds 3] [--rounds 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from timing import print_table, time_interleaved, timing_rows, write_json

from gaqat.data import build_digits, load_dataset
from gaqat.data.digits_cache import ARRAYS_FILE, CACHE_FOLDER
from gaqat.data.loaders import make_loaders

BUILD_GOAL_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="1 build, 5 rounds")
    parser.add_argument("--build-rounds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    build_rounds, rounds = (1, 5) if args.short else (args.build_rounds, args.rounds)

    with tempfile.TemporaryDirectory() as tmp:
        fresh = iter(range(10**6))
        manifests = []

        def build() -> None:  # a new folder each time: always a full build
            manifests.append(build_digits(Path(tmp) / f"build{next(fresh)}")[1])

        builds = time_interleaved({"build": build}, rounds=build_rounds, warmup=0)
        data_dir = Path(tmp) / "build0"
        ds = load_dataset("digits", data_dir)
        loaders = make_loaders(ds, test_envs=[1], batch_size=32, seed=0)
        plain = make_loaders(ds, test_envs=[1], batch_size=32, seed=0, augment=False)

        def evaluate() -> None:
            for loader in loaders.eval.values():
                for _ in loader:
                    pass

        others = time_interleaved(
            {
                "load_cached": lambda: load_dataset("digits", data_dir),
                "train_step_shift": lambda: next(loaders.train),
                "train_step_plain": lambda: next(plain.train),
                "eval_all_splits": evaluate,
            },
            rounds=rounds,
            warmup=1,
        )
        npz_mb = (data_dir / CACHE_FOLDER / ARRAYS_FILE).stat().st_size / 2**20

    hashes = sorted({m["content_sha256"] for m in manifests})
    rows = timing_rows({**builds, **others})
    print_table(rows, ["candidate", "median_ms", "iqr_ms"], title="DigitsDG data costs")
    build_s = builds["build"].median_ms / 1e3
    print(
        f"\nbuild {build_s:.1f} s (goal < {BUILD_GOAL_S:.0f} s: "
        f"{'met' if build_s < BUILD_GOAL_S else 'MISSED'}); cache {npz_mb:.1f} MiB; "
        f"{len(hashes)} distinct content hash(es) over {len(manifests)} builds: {hashes[0]}"
    )
    path = write_json(
        "data_digits",
        {
            "short": args.short,
            "rows": rows,
            "build_goal_s": BUILD_GOAL_S,
            "cache_mib": npz_mb,
            "content_sha256": hashes,
            "counts": manifests[0]["counts"],
            "fonts": manifests[0]["fonts"],
            "sources": manifests[0]["sources"],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
