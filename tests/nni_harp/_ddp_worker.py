"""Worker for test_distributed.py: HARP pruning + fine-tuning of a tiny CNN on fixed random data,
under torchrun (gloo) or in one process with the same global batch. Writes masks, rates and the
final weights of rank 0 (and the cross-rank differences) to --out."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nni_harp import compact
from nni_harp import distributed as hd
from nni_harp.adversarial import AttackConfig, make_adversarial_loss

GLOBAL_BATCH = 32


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    info = hd.init_from_env("gloo")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(128, 3, 16, 16, generator=g), torch.randint(0, 10, (128,), generator=g))
    world = hd.world_size()
    sampler = DistributedSampler(data, num_replicas=world, rank=hd.rank(), shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    model = tiny_model()
    attack = AttackConfig(eps=8 / 255, step_size=4 / 255, steps=2, random_start=False)
    adv = make_adversarial_loss("pgd", attack)
    example = data[0][0].unsqueeze(0)
    masks, pinfo = compact.prune(model, loader, adv, "harp", "unstructured", 0.8, 2, 0.1, example,
                                 options={"gamma_0": 0.05})
    rates = pinfo["layer_rates"]
    flat = {f"{m}.{t}": v for m, d in masks.items() for t, v in d.items()}
    diffs = {"masks": hd.max_difference(flat),
             "rates": hd.max_difference({k: torch.tensor(v) for k, v in rates.items()})}
    compact.finetune(model, masks, loader, adv, 1, 0.01)
    diffs["weights"] = hd.max_difference(model.state_dict())
    if hd.is_main():
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"masks": flat, "rates": rates, "state": model.state_dict()}, out / "result.pt")
        (out / "diffs.json").write_text(json.dumps({**diffs, "world_size": world, "backend": info.backend}))
    hd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
