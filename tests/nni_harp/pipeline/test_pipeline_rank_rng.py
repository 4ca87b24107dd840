"""Under torchrun, an epoch checkpoint holds every rank's RNG states and a resumed rank gets its
own back (2 gloo processes on loopback): without that, rank 1 would continue from rank 0's
streams and draw other PGD starts than an uninterrupted run."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nni_harp._io import safe_load
from nni_harp.pipeline.checkpoint import RunStore, restore_rank_rng

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # every rank has its own stream
        store = RunStore(root, writer=rank == 0)
        if rank == 0:
            store.start({"model": "x"}, resume=False, overwrite=False, keys=("model",))
        dist.barrier()
        store.save_epoch("prune", 0, {"model": {}} if rank == 0 else {})
        expected = torch.rand(4)  # what an uninterrupted run draws next
        dist.barrier()
        torch.manual_seed(7)  # a restarted process starts from anywhere
        restore_rank_rng(safe_load(store.stage_path("prune")))
        torch.save({"expected": expected, "resumed": torch.rand(4)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_rank_resumes_its_own_random_stream(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=world, join=True)
    draws = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert not torch.equal(draws[0]["expected"], draws[1]["expected"])  # the ranks' streams differ
    for rank, d in enumerate(draws):
        assert torch.equal(d["resumed"], d["expected"]), rank
    payload = safe_load(RunStore(tmp_path / "run").stage_path("prune"))
    assert len(payload["rng_ranks"]) == world


def test_single_process_checkpoint_has_no_per_rank_states(tmp_path):
    store = RunStore(tmp_path)
    store.start({"model": "x"}, resume=False, overwrite=False, keys=("model",))
    torch.manual_seed(3)
    store.save_epoch("prune", 0, {})
    expected = torch.rand(4)
    torch.manual_seed(9)
    payload = safe_load(store.stage_path("prune"))
    assert "rng_ranks" not in payload
    restore_rank_rng(payload)
    assert torch.equal(torch.rand(4), expected)
