"""NNI trial: ``python -m nni_harp.trial`` (the ``trialCommand`` of an NNI experiment).

Parameters come from ``nni.get_next_parameter()`` and fill in :data:`DEFAULTS` (outside an
experiment NNI returns nothing and the defaults are used; ``--param key=value`` overrides any of
them, for trying a trial by hand). The trial adversarially trains a timm model, prunes it with the
pruner named by ``pruner`` (see :mod:`nni_harp.registry`: harp, hydra, l1norm, l2norm, fpgm,
taylor, movement), fine-tunes it adversarially with the masks fixed and evaluates it.

Reported to NNI: after every pruning and fine-tuning epoch an intermediate result
``{'default': PGD accuracy on a small evaluation subset, 'clean': ..., 'stage': ..., 'epoch': ...}``;
at the end the final result ``{'default': robust (PGD) accuracy, 'clean_acc', 'robust_acc',
'sparsity', 'flops_kept', 'target_sparsity', 'pruner', 'seconds'}``. Accuracies are fractions.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Mapping, Sequence

import torch

__all__ = ["DEFAULTS", "resolve_params", "run_trial", "main"]

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "pruner": "harp",
    "model": "test_resnet",
    "dataset": "digits",
    "image_size": 32,
    "mode": "unstructured",
    "sparsity": 0.9,
    "gamma_0": 0.01,
    "adv_loss": "pgd",
    "eps": 8 / 255,
    "attack_steps": 2,
    "pretrain_epochs": 2,
    "prune_epochs": 2,
    "finetune_epochs": 1,
    "batch_size": 64,
    "pretrain_lr": 0.05,
    "prune_lr": 0.1,
    "finetune_lr": 0.01,
    "max_train_batches": None,
    "eval_batches": 2,
    "eval_attack_steps": 5,
    "seed": 0,
}


def resolve_params(received: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS updated with NNI's parameters and then ``overrides``; unknown keys are an error."""
    params = dict(DEFAULTS)
    for source in (received or {}, overrides or {}):
        unknown = sorted(set(source) - set(DEFAULTS))
        if unknown:
            raise KeyError(f"trial parameter {unknown[0]!r} is unknown; known: {', '.join(DEFAULTS)}")
        params.update(source)
    for key in ("sparsity", "gamma_0", "eps", "pretrain_lr", "prune_lr", "finetune_lr"):
        params[key] = float(params[key])
    return params


def run_trial(params: Mapping[str, Any], report: Any = None) -> dict[str, Any]:
    """Run one trial; ``report`` has ``report_intermediate_result`` / ``report_final_result``
    (the ``nni`` module in an experiment). Returns the final result dict."""
    from . import compact
    from . import distributed as hd
    from .adversarial import AttackConfig, make_adversarial_loss
    from .data import build_loaders
    from .loading import create_model

    start = time.perf_counter()
    torch.manual_seed(int(params["seed"]))
    train_loader, test_loader, info = build_loaders(
        params["dataset"], image_size=int(params["image_size"]), batch_size=int(params["batch_size"]),
        seed=int(params["seed"]), distributed=hd.is_distributed(),
    )
    model, _ = create_model(params["model"], info.num_classes, info.in_chans, int(params["image_size"]), info.mean, info.std)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    eps, steps = float(params["eps"]), int(params["attack_steps"])
    adv_loss = make_adversarial_loss(params["adv_loss"], AttackConfig(eps=eps, step_size=2.5 * eps / steps, steps=steps))
    eval_steps = int(params["eval_attack_steps"])
    eval_attack = AttackConfig(eps=eps, step_size=2.5 * eps / eval_steps, steps=eval_steps)
    example = next(iter(test_loader))[0][:1].to(device)
    max_batches = params["max_train_batches"]
    eval_batches = params["eval_batches"]

    epoch_count = {"n": 0}

    def on_epoch_end(stage: str, epoch: int, metrics: Mapping[str, float]) -> None:
        if stage == "pretrain":
            return
        quick = compact.evaluate(model, test_loader, eval_attack, max_batches=eval_batches)
        result = {"default": quick["robust"], "clean": quick["clean"], "stage": stage, "epoch": epoch_count["n"],
                  **{k: float(v) for k, v in metrics.items()}}
        epoch_count["n"] += 1
        if report is not None and hd.is_main():
            report.report_intermediate_result(result)
        logger.info("intermediate %s", result)

    # 1. adversarial pretraining of the dense model
    if int(params["pretrain_epochs"]) > 0:
        from .adversarial import training_step_for

        opt = torch.optim.SGD(model.parameters(), lr=float(params["pretrain_lr"]), momentum=0.9, weight_decay=5e-4)
        compact.train_epochs(model, train_loader, opt, training_step_for(adv_loss), int(params["pretrain_epochs"]),
                             max_batches=max_batches, stage="pretrain")
    dense = compact.evaluate(model, test_loader, eval_attack, max_batches=eval_batches)
    # 2. prune
    options = {"gamma_0": float(params["gamma_0"])} if params["pruner"] in ("harp", "hydra") else {}
    masks, info_p = compact.prune(
        model, train_loader, adv_loss, params["pruner"], params["mode"], float(params["sparsity"]),
        int(params["prune_epochs"]), float(params["prune_lr"]), example, max_batches=max_batches,
        options=options, on_epoch_end=on_epoch_end,
    )
    # 3. fine-tune with the masks fixed
    compact.finetune(model, masks, train_loader, adv_loss, int(params["finetune_epochs"]), float(params["finetune_lr"]),
                     max_batches=max_batches, on_epoch_end=on_epoch_end)
    # 4. evaluate
    final = compact.evaluate(model, test_loader, eval_attack, max_batches=eval_batches)
    result = {
        "default": final["robust"],
        "robust_acc": final["robust"],
        "clean_acc": final["clean"],
        "dense_robust_acc": dense["robust"],
        "dense_clean_acc": dense["clean"],
        "sparsity": compact.sparsity_of(model),
        "flops_kept": compact.flops_kept(model, example),
        "target_sparsity": float(params["sparsity"]),
        "pruner": str(params["pruner"]),
        "eval_samples": int(final["n"]),
        "seconds": time.perf_counter() - start,
    }
    if report is not None and hd.is_main():
        report.report_final_result(result)
    return result


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nni_harp.trial", description=__doc__.splitlines()[0])
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trial parameter (value parsed as JSON when it can be)")
    parser.add_argument("--json-out", help="also write the final result to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    import nni

    received = nni.get_next_parameter()
    params = resolve_params(received, _parse_overrides(args.param))
    logger.info("trial parameters: %s", params)
    result = run_trial(params, nni)
    print(json.dumps(result, sort_keys=True))
    if args.json_out:
        from ._io import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
