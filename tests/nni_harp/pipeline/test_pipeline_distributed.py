"""Sharding of the training batches over ranks (no process group needed): the ranks' batches at
each step together are the single process's batch, and a non-divisible global batch is refused."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from nni_harp.pipeline._loop import epoch_loader


def _labels(loader) -> list[list[int]]:
    return [batch[1].tolist() for batch in loader]


@pytest.mark.parametrize("world", [2, 4])
def test_rank_batches_together_are_the_single_process_batch(world):
    data = TensorDataset(torch.zeros(100, 1), torch.arange(100))
    single = _labels(epoch_loader(data, 20, seed=3, stage="prune", epoch=1))
    shards = [_labels(epoch_loader(data, 20, seed=3, stage="prune", epoch=1, rank=r, world=world)) for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for step, batch in enumerate(single):
        together = sorted(i for s in shards for i in s[step])
        assert together == sorted(batch), step
    # and the next epoch shuffles differently
    assert _labels(epoch_loader(data, 20, seed=3, stage="prune", epoch=2)) != single


def test_global_batch_must_divide_over_the_processes(tmp_path, monkeypatch):
    from nni_harp import distributed as hd
    from nni_harp.pipeline import ConfigError, PipelineConfig, run

    info = hd.DistInfo(rank=0, world_size=3, local_rank=0, backend="gloo", device=torch.device("cpu"))
    monkeypatch.setattr(hd, "init_from_env", lambda backend=None: info)
    config = PipelineConfig(model="test_resnet", batch_size=32, output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="global batch 32 must be divisible by the 3 processes"):
        run(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size, batch, world, sizes", [
    (100, 20, 1, [20] * 5),  # no partial batch
    (103, 20, 1, [20] * 5),  # the partial last batch (3) is left out
    (101, 20, 1, [20] * 5),
    (7, 20, 1, [7]),  # fewer samples than one batch: the one batch there is
    (103, 20, 2, [10] * 5),  # per rank: 52 samples (padded), batches of 10
])
def test_an_epoch_leaves_out_its_partial_last_batch_and_counts_its_steps_alike(size, batch, world, sizes):
    from nni_harp.pipeline._loop import EpochLoop

    data = TensorDataset(torch.zeros(size, 1), torch.arange(size))
    loader = epoch_loader(data, batch, seed=0, stage="prune", epoch=0, rank=0, world=world)
    assert [len(labels) for labels in _labels(loader)] == sizes
    loop = EpochLoop("prune", data, batch, 0, store=None, callbacks=None, world=world)  # type: ignore[arg-type]
    assert loop.steps_per_epoch() == len(sizes)
