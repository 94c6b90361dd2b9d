"""Several ranks training one run (gaqat.distributed): the two-pass step on 2 gloo processes
equals one process's step on the same global batch, and ``torchrun -m gaqat train`` works."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TINY, tiny_argv, tiny_run

from gaqat.algorithms import Algorithm
from gaqat.distributed import SyncBatchNorm2d, synchronise_batch_norm
from gaqat.errors import UsageError
from gaqat.hparams import default_hparams
from gaqat.models import ModelConfig
from gaqat.runfolder import CHECKPOINT, DONE, RESULTS
from gaqat.train import check

STEPS, DOMAINS, PER_DOMAIN = 12, 3, 8
HPARAMS = {**default_hparams("gaqat", "digits"), "window": 2, "tau": 0.9}


def global_batches():
    """STEPS steps of one (x, y) minibatch per domain, float64 so that the comparison sees
    the method, not float32 reduction order (which Adam amplifies where a gradient is ~0)."""
    g = torch.Generator().manual_seed(1)
    return [
        [
            (
                torch.randn(PER_DOMAIN, 3, 12, 12, generator=g, dtype=torch.float64) + d,
                torch.randint(0, 10, (PER_DOMAIN,), generator=g),
            )
            for d in range(DOMAINS)
        ]
        for _ in range(STEPS)
    ]


def train(rank: int = 0, ranks: int = 1) -> Algorithm:
    torch.manual_seed(0)
    algorithm = Algorithm("gaqat", ModelConfig(), HPARAMS, STEPS, bits=3)
    algorithm.network.double()
    batches = global_batches()
    if ranks > 1:  # as gaqat.train does
        algorithm.prime(batches[0])
        algorithm.distribute(torch.device("cpu"))
    shard = slice(rank * PER_DOMAIN // ranks, (rank + 1) * PER_DOMAIN // ranks)
    for minibatches in batches:
        algorithm.update([(x[shard], y[shard]) for x, y in minibatches])
    return algorithm


def rank_main(rank: int, ranks: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    torch.set_num_threads(1)
    try:
        algorithm = train(rank, ranks)
        torch.save(
            {"model": algorithm.network.state_dict(), "frozen": sorted(algorithm.freezer.frozen)},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    reference = train()
    assert reference.freezer.frozen, "the check needs freezes to compare"
    expected = reference.network.state_dict()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["frozen"] == sorted(reference.freezer.frozen)
        for key, value in expected.items():
            if value.is_floating_point():
                difference = (got["model"][key] - value).abs().max().item()
                assert difference < 1e-9, (rank, key, difference)
            else:
                assert torch.equal(got["model"][key], value), (rank, key)


def test_synchronised_batch_norm_is_batch_norm_with_one_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    weight = model[1].weight
    synchronise_batch_norm(model)
    assert type(model[1]) is SyncBatchNorm2d and model[1].weight is weight
    plain = torch.nn.BatchNorm2d(4)
    plain.load_state_dict(model[1].state_dict())
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(model(x), plain(model[0](x)))


def torchrun(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "gaqat", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_a_batch_that_does_not_split_is_refused_before_anything_starts(
    tmp_path, digits_dir, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UsageError, match="divisible by 3"):
        check(tiny_run(tmp_path / "odd", digits_dir))
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow
def test_torchrun_run_rank_0_writes_and_a_stopped_one_resumes_to_the_same_weights(
    tmp_path, digits_dir
):
    def argv(out, *extra):
        args = tiny_argv(out, digits_dir, "--algorithm", "gaqat", "--bits", "3", "--from-scratch")
        args[args.index("--hparams") + 1] = json.dumps({**TINY, "window": 2, "tau": 0.9})
        return [*args, "--steps", "8", "--checkpoint-freq", "2", "--quiet", *extra]

    straight = torchrun(*argv(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "straight" / RESULTS).open()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # rank 0 alone writes
    assert records[0]["args"]["world_size"] == 2
    assert straight.stdout.count("finished") == 1  # one summary

    # A refusal on rank 0 (the run is finished) stops every rank with its message.
    again = torchrun(*argv(tmp_path / "straight"))
    assert again.returncode != 0 and "holds a finished run" in again.stderr

    out = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher = subprocess.Popen(
        [*command, "--nproc-per-node=2", "-m", "gaqat", *argv(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    launcher.wait(timeout=60)
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    assert saved["step"] < 8 and not (out / DONE).exists()
    assert len(saved["rng_ranks"]) == 2  # each rank's random state, for the resume

    resumed = torchrun(*argv(out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)["model"]
    got = torch.load(out / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert (out / RESULTS).read_text().count("\n") == 4  # steps 2, 4, 6, 8, once each
