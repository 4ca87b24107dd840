"""HARP pruning + adversarial fine-tuning with DistributedDataParallel on the digits data.

    torchrun --nproc_per_node=2 examples/distributed/harp_ddp.py --model test_resnet --out runs/ddp
    python examples/distributed/harp_ddp.py ...            # the same, one process

nccl on GPUs (one per process), gloo on CPU. Every rank sees its own shard of each batch
(DistributedSampler, global batch = --batch-size x world size); HARP's score and rate gradients
are averaged over ranks before each step, fine-tuning runs under DDP. Only rank 0 logs, saves the
masks/rates and prints the result; the script checks that scores' outcome (masks, rates) is
identical on every rank.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from nni_harp import compact
from nni_harp import distributed as hd
from nni_harp._io import atomic_save, atomic_write_text
from nni_harp.adversarial import AttackConfig, make_adversarial_loss
from nni_harp.data import build_loaders
from nni_harp.loading import create_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--gamma-0", type=float, default=0.01)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--prune-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--max-train-batches", type=int, default=None)
    p.add_argument("--attack-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ddp")
    args = p.parse_args()

    info = hd.init_from_env()
    logging.basicConfig(level=logging.INFO if hd.is_main() else logging.WARNING,
                        format=f"[rank {info.rank}] %(asctime)s %(name)s %(message)s")
    log = logging.getLogger("harp_ddp")
    try:
        torch.manual_seed(args.seed)
        train, test, dinfo = build_loaders("digits", batch_size=args.batch_size, seed=args.seed, distributed=True)
        model, _ = create_model(args.model, dinfo.num_classes, dinfo.in_chans, 32, dinfo.mean, dinfo.std)
        model.to(info.device)
        hd.broadcast_module(model)  # the same start on every rank
        eps, steps = 8 / 255, args.attack_steps
        adv = make_adversarial_loss("pgd", AttackConfig(eps=eps, step_size=2.5 * eps / steps, steps=steps))
        example = next(iter(test))[0][:1].to(info.device)
        if args.pretrain_epochs:
            from torch.nn.parallel import DistributedDataParallel as DDP

            from nni_harp.adversarial import training_step_for

            net = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None) if hd.is_distributed() else model
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            compact.train_epochs(net, train, opt, training_step_for(adv), args.pretrain_epochs,
                                 max_batches=args.max_train_batches, sync_grads=False, stage="pretrain")
        masks, pinfo = compact.prune(model, train, adv, "harp", "unstructured", args.sparsity, args.prune_epochs, 0.1,
                                     example, max_batches=args.max_train_batches, options={"gamma_0": args.gamma_0})
        rates = {k: torch.tensor(v) for k, v in pinfo.get("layer_rates", {}).items()}
        flat = {f"{m}.{t}": v for m, d in masks.items() for t, v in d.items()}
        mask_diff, rate_diff = hd.max_difference(flat), hd.max_difference(rates)
        compact.finetune(model, masks, train, adv, args.finetune_epochs, 0.01, max_batches=args.max_train_batches)
        weight_diff = hd.max_difference({k: v.cpu() for k, v in model.state_dict().items()})
        ev = compact.evaluate(model, test, AttackConfig(eps=eps, step_size=2.5 * eps / 5, steps=5), max_batches=4)
        result = {"world_size": info.world_size, "backend": info.backend, "mask_max_diff_across_ranks": mask_diff,
                  "rate_max_diff_across_ranks": rate_diff, "weight_max_diff_across_ranks": weight_diff,
                  "sparsity": compact.sparsity_of(model), **ev}
        if hd.is_main():
            out = Path(args.out)
            atomic_save(masks, out / "masks.pt")
            atomic_write_text(out / "result.json", json.dumps({**result, "layer_rates": pinfo.get("layer_rates", {})}, indent=2))
            log.info("result: %s", result)
            print(json.dumps(result))
        return 0 if mask_diff == 0.0 and rate_diff == 0.0 and weight_diff == 0.0 else 1
    finally:
        hd.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
