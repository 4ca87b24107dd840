"""Robust accuracy after pruning: HARP against HYDRA, magnitude pruning, Torch-Pruning and NNI.

One dense model is adversarially trained (PGD-AT) once and cached. Every method then prunes a copy
of it to each target and fine-tunes the remaining weights with the same PGD-AT budget
(``--finetune-epochs``; masked fine-tuning, or plain fine-tuning of Torch-Pruning's physically
smaller model). HARP and HYDRA first learn their scores (and HARP its rates) for
``--prune-epochs`` with the weights frozen, through NNI's ``TorchEvaluator``. Reported: clean,
PGD-20 and AutoAttack accuracy, and the kept parameters and FLOPs. Structured results (masks) are
physically pruned by ``graph_passes.ModelSpeedup`` and measured on the smaller model.

Targets: unstructured sparsity of the Conv2d/Linear weights (one global budget) and structured
FLOPs removed. Methods:

- ``harp`` / ``hydra``: :class:`nni_harp.HARPPruner` / :class:`nni_harp.HydraPruner`;
- ``global-mag``: unstructured, one |w| threshold over every layer; structured, one threshold over
  the L2 norms of every prunable channel group's channels, found by bisection on the FLOPs;
- ``layer-mag``: unstructured, each layer keeps its top ``1 - sparsity`` |w|; structured, every
  prunable group keeps the same fraction of its highest-norm channels (bisection on the FLOPs);
- ``torch-pruning``: Torch-Pruning's ``MagnitudePruner`` (group L2 importance, local ratios),
  ratio found by bisection on the FLOPs (structured only);
- ``nni-l1``: NNI 3.0's ``L1NormPruner`` on every Conv2d (uniform ratio, bisection on the FLOPs
  that ``ModelSpeedup`` keeps; it ignores channel coupling, so coupled channels are only removed
  where all coupled convs agree) (structured only).

AutoAttack: on CPU by default the reduced ``apgd-ce+apgd-t`` version (torchattacks' APGD-CE and
APGD-T, no FAB-T/Square) on the same test samples as PGD-20 (``--aa-samples N``: the first N); ``--autoattack standard``
runs torchattacks' full AutoAttack. The header of the written table says which was used.

    python benchmarks/robust_pruning.py                       # test_resnet, digits 16 px, CPU
    python benchmarks/robust_pruning.py --model resnet18 --dataset cifar10 --data-dir DIR \\
        --image-size 32 --pretrain-epochs 100 --prune-epochs 20 --finetune-epochs 100 \\
        --train-attack-steps 10 --autoattack standard --aa-samples 10000 --device cuda

Writes ``benchmarks/results/robust_pruning.md`` and ``.json`` (atomically).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nni  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import graph_passes as gp  # noqa: E402
from _common import RESULTS, n_flops, n_params, write_atomic  # noqa: E402
from nni_harp.adversarial import (  # noqa: E402
    AttackConfig, evaluate_robustness, make_adversarial_loss, training_step_for, with_normalization,
)
from nni_harp.data import build_loaders  # noqa: E402
from nni_harp.pruning import HARPPruner, HydraPruner, fix_masks, release_masks  # noqa: E402
from nni_harp.pruning.budget import layer_flops  # noqa: E402

log = logging.getLogger("robust_pruning")

Masks = dict[str, dict[str, torch.Tensor]]
METHODS = ("harp", "hydra", "global-mag", "layer-mag", "torch-pruning", "nni-l1")
LABELS = {
    "dense": "dense (PGD-AT)", "harp": "HARP", "hydra": "HYDRA", "global-mag": "global magnitude",
    "layer-mag": "layer-wise magnitude", "torch-pruning": "Torch-Pruning MagnitudePruner", "nni-l1": "NNI L1NormPruner",
}
NOT_APPLICABLE = {
    ("torch-pruning", "unstructured"): "Torch-Pruning removes whole channels (structured only)",
    ("nni-l1", "unstructured"): "L1NormPruner ranks output channels by L1 norm (structured only)",
}


@dataclass(frozen=True)
class Options:
    model: str = "test_resnet"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 16
    batch_size: int = 64
    eps: float = 8 / 255
    train_attack_steps: int = 3
    pretrain_epochs: int = 10
    prune_epochs: int = 3
    finetune_epochs: int = 3
    pretrain_lr: float = 0.05
    finetune_lr: float = 0.01
    prune_lr: float = 0.1
    gamma_0: float = 0.1
    unstructured: tuple[float, ...] = (0.9, 0.95, 0.99)
    structured: tuple[float, ...] = (0.5, 0.75)
    methods: tuple[str, ...] = METHODS
    eval_samples: int | None = None
    aa_samples: int | None = None
    autoattack: str = "apgd-ce+apgd-t"
    seed: int = 0
    device: str = "cpu"

    def cache_key(self) -> str:
        keys = ("model", "dataset", "image_size", "batch_size", "eps", "train_attack_steps", "pretrain_epochs",
                "pretrain_lr", "seed")
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Row:
    method: str
    mode: str  # dense | unstructured | structured
    target: float | None  # sparsity (unstructured) or fraction of FLOPs removed (structured)
    clean: float | None = None
    pgd20: float | None = None
    autoattack: float | None = None
    kept_params: float | None = None  # non-zero (unstructured) / remaining (structured) params, whole model
    kept_flops: float | None = None  # structured: measured on the smaller model; unstructured: conv/linear, sparse
    seconds: float | None = None
    note: str = ""
    rates: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- data
class Setup:
    """The data, the attacks and the training loops every method shares."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.device = torch.device(opts.device)
        _, test_loader, self.info = self._loaders()
        self.example = next(iter(test_loader))[0][:2].to(self.device)
        self.train_attack = AttackConfig(eps=opts.eps, step_size=2.5 * opts.eps / opts.train_attack_steps,
                                         steps=opts.train_attack_steps)
        self.eval_attack = AttackConfig(eps=opts.eps, step_size=2.5 * opts.eps / 20, steps=20)
        self.step = training_step_for(make_adversarial_loss("pgd", self.train_attack))
        self.test_batches = _take(test_loader, opts.eval_samples)
        same = opts.aa_samples is None or opts.aa_samples == opts.eval_samples
        self.aa_batches = self.test_batches if same else _take(test_loader, opts.aa_samples)

    def _loaders(self):
        o = self.opts
        return build_loaders(o.dataset, o.data_dir, image_size=o.image_size, batch_size=o.batch_size, seed=o.seed)

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.opts.seed)
        net = timm.create_model(self.opts.model, num_classes=self.info.num_classes)
        return with_normalization(net, self.info.mean, self.info.std).to(self.device)

    def training_func(self) -> Callable[..., None]:
        """A TorchEvaluator training function over a fresh train loader (same batch order for every
        method), one pass per epoch, honouring max_steps / max_epochs."""
        loader = self._loaders()[0]
        device = self.device

        def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
            steps = 0
            for _ in range(max_epochs or 1):
                model.train()
                for x, y in loader:
                    optimizers.zero_grad()
                    training_step((x.to(device), y.to(device)), model).backward()
                    optimizers.step()
                    steps += 1
                    if max_steps is not None and steps >= max_steps:
                        return
                for sched in ([] if lr_schedulers is None else
                              lr_schedulers if isinstance(lr_schedulers, (list, tuple)) else [lr_schedulers]):
                    sched.step()

        return training_func

    def adversarial_training(self, model: nn.Module, epochs: int, lr: float) -> None:
        if epochs < 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        self.training_func()(model, optimizer, self.step, scheduler, max_epochs=epochs)

    def evaluate(self, model: nn.Module) -> tuple[float, float, float]:
        model.eval()
        if self.aa_batches is self.test_batches:  # one pass: clean, PGD-20 and AutoAttack on the same samples
            both = evaluate_robustness(model, self.test_batches, self.eval_attack, autoattack=True,
                                       autoattack_version=self.opts.autoattack, seed=self.opts.seed)
            return both.clean, both.pgd, float(both.autoattack)  # type: ignore[arg-type]
        report = evaluate_robustness(model, self.test_batches, self.eval_attack, autoattack=False)
        aa = evaluate_robustness(model, self.aa_batches, self.eval_attack, autoattack=True,
                                 autoattack_version=self.opts.autoattack, seed=self.opts.seed)
        return report.clean, report.pgd, float(aa.autoattack)  # type: ignore[arg-type]


def _take(loader: Iterable[Any], limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``limit`` samples of a (non-shuffled) loader, as a fixed list of batches."""
    out, seen = [], 0
    for x, y in loader:
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + len(x) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        out.append((x, y))
        seen += len(x)
    return out


def pretrained(setup: Setup, cache_dir: Path) -> tuple[nn.Module, bool]:
    """The shared adversarially trained dense model (from the cache when present)."""
    path = cache_dir / f"dense_{setup.opts.model}_{setup.opts.dataset}_{setup.opts.cache_key()}.pt"
    model = setup.new_model()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location=setup.device, weights_only=True))
        return model, True
    torch.manual_seed(setup.opts.seed)
    setup.adversarial_training(model, setup.opts.pretrain_epochs, setup.opts.pretrain_lr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, False


# ------------------------------------------------------------------------------------- methods
def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _unstructured_magnitude(model: nn.Module, sparsity: float, global_: bool) -> Masks:
    layers = {n: model.get_submodule(n).weight.detach().abs() for n in _layers(model)}
    if global_:
        flat = torch.cat([w.flatten() for w in layers.values()])
        keep = max(1, round((1 - sparsity) * flat.numel()))
        threshold = torch.topk(flat, keep, sorted=True).values[-1]
        return {n: {"weight": (w >= threshold).float()} for n, w in layers.items()}
    masks = {}
    for n, w in layers.items():
        keep = max(1, round((1 - sparsity) * w.numel()))
        mask = torch.zeros(w.numel())
        mask[torch.topk(w.flatten(), keep).indices] = 1.0
        masks[n] = {"weight": mask.view_as(w)}
    return masks


def _harp(setup: Setup, model: nn.Module, mode: str, target: float, hydra: bool) -> tuple[Masks, dict[str, float]]:
    config: dict[str, Any] = {"op_types": ["Conv2d", "Linear"], "sparse_ratio": target, "global_group_id": 0}
    if mode == "structured":
        config["granularity"] = "out_channel"
    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    from nni.compression import TorchEvaluator

    evaluator = TorchEvaluator(setup.training_func(), optimizer, setup.step, dummy_input=setup.example)
    cls = HydraPruner if hydra else HARPPruner
    kwargs: dict[str, Any] = {"score_lr": setup.opts.prune_lr, "rate_lr": setup.opts.prune_lr}
    if not hydra:
        kwargs["gamma_0"] = setup.opts.gamma_0
    pruner = cls(model, [config], evaluator, dummy_input=setup.example, **kwargs)
    _, masks = pruner.compress(max_steps=None, max_epochs=setup.opts.prune_epochs)
    rates = pruner.layer_rates()
    pruner.unwrap_model()
    return masks, rates


class Structure:
    """Channel groups and cost model of the dense model, for the structured magnitude baselines."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.groups = [g for g in gp.channel_groups(model, (example,))]
        self.prunable = [g for g in self.groups if g.prunable]
        self.cost = gp.cost(model, (example,))
        self.total = float(self.cost.total_flops)

    def flops_kept(self, fractions: dict[int, float]) -> float:
        return float(self.cost.flops(fractions)) / self.total

    def keep_from_producers(self, masks: Masks) -> dict[int, torch.Tensor]:
        """Channel keep vectors from the output rows of the producing layers' weight masks only (a
        channel goes when every producer of its group removed it), ignoring the consumers' masks."""
        keep = {}
        for g in self.prunable:
            kept, seen = torch.zeros(g.size, dtype=torch.bool), False
            for m in g.members:
                mask = masks.get(m.module, {}).get("weight") if m.role == "out" and m.param == "weight" else None
                if mask is None:
                    continue
                seen = True
                rows = mask.index_select(m.dim, torch.tensor(m.index)).movedim(m.dim, 0).reshape(len(m.index), -1)
                kept[torch.tensor(m.channel)[(rows != 0).any(dim=1)]] = True
            keep[g.id] = kept if seen else torch.ones(g.size, dtype=torch.bool)
        return keep

    def flops_of_keep(self, keep: dict[int, torch.Tensor]) -> float:
        return self.flops_kept({gid: float(k.float().mean()) for gid, k in keep.items()})


def _bisect(kept: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 1.0, steps: int = 30) -> float:
    """x in [lo, hi] with kept(x) closest to target from below; kept is non-increasing in x."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if kept(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def _structured_magnitude(model: nn.Module, st: Structure, keep_flops: float, global_: bool) -> Masks:
    norms = {g.id: gp.channel_norms(model, g).detach() for g in st.prunable}

    def keep_vectors(x: float) -> dict[int, torch.Tensor]:
        out = {}
        for g in st.prunable:
            n = norms[g.id]
            if global_:  # x is the fraction of the largest norm below which channels go
                k = n >= x * float(max(v.max() for v in norms.values()))
                if not k.any():
                    k = torch.zeros_like(k)
                    k[n.argmax()] = True
            else:  # x is the fraction of every group's channels removed
                count = min(g.size, max(1, round((1 - x) * g.size)))
                k = torch.zeros(g.size, dtype=torch.bool)
                k[torch.topk(n, count).indices] = True
            out[g.id] = k
        return out

    def kept(x: float) -> float:
        return st.flops_kept({gid: float(k.float().mean()) for gid, k in keep_vectors(x).items()})

    x = _bisect(kept, keep_flops)
    return gp.group_masks(model, st.prunable, keep_vectors(x))


def _nni_l1(model: nn.Module, st: Structure, keep_flops: float) -> Masks:
    """NNI's L1NormPruner picks each conv's output channels; like NNI's own speedup, the choice is
    propagated to the consumers (a channel of a coupled group goes only if every producer drops it)."""
    from nni.compression.pruning import L1NormPruner

    def keep_for(ratio: float) -> dict[int, torch.Tensor]:
        trial = copy.deepcopy(model)
        pruner = L1NormPruner(trial, [{"op_types": ["Conv2d"], "sparse_ratio": ratio}])
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return st.keep_from_producers({m: {p: t.detach() for p, t in d.items() if t is not None} for m, d in masks.items()})

    ratio = _bisect(lambda r: st.flops_of_keep(keep_for(r)), keep_flops, hi=0.99, steps=14)
    return gp.group_masks(model, st.prunable, keep_for(ratio))


def _torch_pruning(setup: Setup, model: nn.Module, keep_flops: float) -> nn.Module:
    import torch_pruning as tp

    dense = n_flops(model, setup.example)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]

    def pruned(ratio: float) -> nn.Module:
        trial = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(trial, setup.example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[trial.get_submodule(n) for n, m in
                                                                                model.named_modules() if m in classifier])
        pruner.step()
        return trial

    ratio = _bisect(lambda r: n_flops(pruned(r), setup.example) / dense, keep_flops, hi=0.99, steps=14)
    return pruned(ratio)


# -------------------------------------------------------------------------------------- runner
def _sparse_flops_kept(model: nn.Module, masks: Masks, example: torch.Tensor) -> float:
    names = _layers(model)
    flops = layer_flops(model, example, names)
    total = sum(flops.values())
    return sum(flops[n] * float(masks[n]["weight"].mean()) if n in masks else flops[n] for n in names) / total


def run_one(setup: Setup, dense: nn.Module, st: Structure, method: str, mode: str, target: float) -> Row:
    row = Row(method, mode, target)
    start = time.perf_counter()
    model = copy.deepcopy(dense)
    torch.manual_seed(setup.opts.seed)
    small: nn.Module | None = None
    if mode == "unstructured":
        if method in ("harp", "hydra"):
            masks, row.rates = _harp(setup, model, mode, target, method == "hydra")
        else:
            masks = _unstructured_magnitude(model, target, global_=method == "global-mag")
    else:
        keep_flops = 1.0 - target
        if method in ("harp", "hydra"):
            masks, row.rates = _harp(setup, model, mode, target, method == "hydra")
        elif method in ("global-mag", "layer-mag"):
            masks = _structured_magnitude(model, st, keep_flops, global_=method == "global-mag")
        elif method == "nni-l1":
            masks = _nni_l1(model, st, keep_flops)
        else:
            small, masks = _torch_pruning(setup, model, keep_flops), {}
    log.info("%s %s %.2f: pruned in %.0f s", method, mode, target, time.perf_counter() - start)
    if small is None:
        fix_masks(model, masks)
        setup.adversarial_training(model, setup.opts.finetune_epochs, setup.opts.finetune_lr)
        release_masks(model)
        model.eval()
        if mode == "structured":
            small = gp.ModelSpeedup(copy.deepcopy(model), setup.example, masks).speedup_model()
            masked = gp.masked_copy(model, masks).eval()
            with torch.no_grad():
                x = setup.test_batches[0][0][:16].to(setup.device)
                diff = float((small.eval()(x) - masked(x)).abs().max())
            if diff > 1e-3:
                row.note = f"speedup differs from masked model by {diff:.2g}"
        else:
            nonzero = sum(int((p != 0).sum()) for p in model.parameters())
            row.kept_params = nonzero / n_params(dense)
            row.kept_flops = _sparse_flops_kept(model, masks, setup.example)
            small = model
    else:
        setup.adversarial_training(small, setup.opts.finetune_epochs, setup.opts.finetune_lr)
    log.info("%s %s %.2f: fine-tuned after %.0f s", method, mode, target, time.perf_counter() - start)
    small.eval()
    if mode == "structured":
        row.kept_params = n_params(small) / n_params(dense)
        row.kept_flops = n_flops(small, setup.example) / n_flops(dense, setup.example)
    row.clean, row.pgd20, row.autoattack = setup.evaluate(small)
    row.seconds = time.perf_counter() - start
    return row


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def render(opts: Options, rows: list[Row], meta: dict[str, Any]) -> str:
    aa = ("AutoAttack (reduced: torchattacks APGD-CE + APGD-T, no FAB-T/Square)"
          if opts.autoattack == "apgd-ce+apgd-t" else f"AutoAttack ({opts.autoattack})")
    lines = [
        "# Robust pruning: HARP vs baselines",
        "",
        f"Model `{opts.model}` on `{opts.dataset}` at {opts.image_size} px, {meta['train_samples']} train / "
        f"{meta['test_samples']} test samples; L-inf eps = {opts.eps * 255:.0f}/255. Dense model: PGD-AT "
        f"(PGD-{opts.train_attack_steps}) for {opts.pretrain_epochs} epochs, shared by every method. Every method "
        f"fine-tunes adversarially (PGD-{opts.train_attack_steps}) for {opts.finetune_epochs} epochs after pruning; "
        f"HARP and HYDRA first learn scores (HARP also rates) for {opts.prune_epochs} epochs with frozen weights "
        f"(score/rate lr {opts.prune_lr}, HARP gamma_0 {opts.gamma_0}).",
        "",
        f"Clean and PGD-20 (step 2.5 eps / 20) accuracy on {meta['eval_n']} test samples; {aa} on the first {meta['aa_n']} test samples. "
        "Kept params: of the whole model (unstructured: non-zero). Kept FLOPs: structured, measured on the physically "
        "pruned model (graph_passes.ModelSpeedup / Torch-Pruning); unstructured, the dense FLOPs of the Conv2d/Linear "
        "layers weighted by their density (what a sparse kernel could skip). All numbers in %.",
        "",
        "torchattacks runs APGD-CE/APGD-T with 10 iterations each, so its AutoAttack can come out weaker than "
        "PGD-20 here; quote the lower of the two as the robust accuracy.",
        "",
        f"Command: `{meta['command']}` ({meta['device']}, {meta['threads']} threads, total {meta['total_minutes']:.1f} min; "
        f"dense model {'from cache' if meta['dense_cached'] else 'trained in this run'}).",
        "",
        *(["**Partial results: the run had not finished when this was written.**", ""] if meta.get("partial") else []),
        f"| setting | method | clean | PGD-20 | {'AA (reduced)' if opts.autoattack == 'apgd-ce+apgd-t' else 'AA'} "
        "| kept params | kept FLOPs | time (s) | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        setting = ("dense" if r.mode == "dense" else
                   f"{100 * r.target:.0f} % sparse (unstructured)" if r.mode == "unstructured" else
                   f"{100 * r.target:.0f} % FLOPs removed (structured)")
        if r.clean is None:
            lines.append(f"| {setting} | {LABELS[r.method]} | n/a | n/a | n/a | n/a | n/a | — | {r.note} |")
            continue
        secs = "—" if r.seconds is None else f"{r.seconds:.0f}"
        lines.append(f"| {setting} | {LABELS[r.method]} | {_pct(r.clean)} | {_pct(r.pgd20)} | {_pct(r.autoattack)} | "
                     f"{_pct(r.kept_params)} | {_pct(r.kept_flops)} | {secs} | {r.note} |")
    harp_rows = [r for r in rows if r.method == "harp" and r.rates]
    if harp_rows:
        lines += ["", "## Kept fraction per layer (unstructured) / per channel group (structured) learned by HARP", ""]
        for r in harp_rows:
            vals = list(r.rates.values())
            lines += [f"### {r.mode}, target {100 * r.target:.0f} %", "",
                      f"min {min(vals):.3f}, max {max(vals):.3f} over {len(vals)} units (HYDRA keeps them uniform).", "",
                      "| layer / group | kept |", "|---|---:|"]
            lines += [f"| `{name}` | {rate:.3f} |" for name, rate in r.rates.items()]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _parse_floats(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must lie in (0, 1), got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Options()
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--dataset", default=d.dataset, help="digits (embedded), cifar10, svhn, imagefolder")
    ap.add_argument("--data-dir", default=None, help="dataset folder (cifar10/svhn/imagefolder)")
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--eps", type=float, default=d.eps * 255, help="L-inf radius in 1/255 units")
    ap.add_argument("--train-attack-steps", type=int, default=d.train_attack_steps)
    ap.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    ap.add_argument("--prune-epochs", type=int, default=d.prune_epochs)
    ap.add_argument("--finetune-epochs", "--epochs", type=int, default=d.finetune_epochs, dest="finetune_epochs")
    ap.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr)
    ap.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    ap.add_argument("--prune-lr", type=float, default=d.prune_lr)
    ap.add_argument("--gamma-0", type=float, default=d.gamma_0)
    ap.add_argument("--unstructured", type=_parse_floats, default=d.unstructured, help="sparsities, e.g. 0.9,0.95,0.99")
    ap.add_argument("--structured", type=_parse_floats, default=d.structured, help="FLOPs removed, e.g. 0.5,0.75")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--eval-samples", type=int, default=None, help="test samples for clean/PGD-20 (default: all)")
    ap.add_argument("--aa-samples", type=int, default=d.aa_samples,
                    help="test samples attacked by AutoAttack (default: the same ones as clean/PGD-20)")
    ap.add_argument("--autoattack", default=d.autoattack, help="apgd-ce+apgd-t (default), standard, apgd-ce, ...")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a small, shared CPU)")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "nni_harp_bench"),
                    help="where the adversarially trained dense model is cached")
    ap.add_argument("--out", default=str(RESULTS / "robust_pruning"), help="output path without suffix")
    args = ap.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    opts = Options(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
        batch_size=args.batch_size, eps=args.eps / 255, train_attack_steps=args.train_attack_steps,
        pretrain_epochs=args.pretrain_epochs, prune_epochs=args.prune_epochs, finetune_epochs=args.finetune_epochs,
        pretrain_lr=args.pretrain_lr, finetune_lr=args.finetune_lr, prune_lr=args.prune_lr, gamma_0=args.gamma_0,
        unstructured=args.unstructured, structured=args.structured, methods=methods, eval_samples=args.eval_samples,
        aa_samples=args.aa_samples, autoattack=args.autoattack, seed=args.seed, device=args.device,
    )
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("nni", "nni_harp", "graph_passes", "torch_pruning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    begin = time.perf_counter()

    setup = Setup(opts)
    dense, cached = pretrained(setup, Path(args.cache_dir))
    dense.eval()
    st = Structure(dense, setup.example)
    rows: list[Row] = []
    t0 = time.perf_counter()
    dense_row = Row("dense", "dense", None, kept_params=1.0, kept_flops=1.0)
    dense_row.clean, dense_row.pgd20, dense_row.autoattack = setup.evaluate(copy.deepcopy(dense))
    dense_row.seconds = time.perf_counter() - t0
    rows.append(dense_row)
    print(f"dense: clean {_pct(dense_row.clean)} PGD-20 {_pct(dense_row.pgd20)} AA {_pct(dense_row.autoattack)}", flush=True)
    for mode, targets in (("unstructured", opts.unstructured), ("structured", opts.structured)):
        for target in targets:
            for method in methods:
                reason = NOT_APPLICABLE.get((method, mode))
                if reason:
                    rows.append(Row(method, mode, target, note=f"n/a: {reason}"))
                    continue
                try:
                    row = run_one(setup, dense, st, method, mode, target)
                except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not hidden
                    log.exception("%s %s %.2f failed", method, mode, target)
                    row = Row(method, mode, target, note=f"failed: {type(exc).__name__}: {str(exc)[:120]}")
                rows.append(row)
                _write(args.out, opts, rows, _meta(args, argv, setup, cached, begin, partial=True))
                print(f"{mode} {target:.2f} {method}: clean {_pct(row.clean)} PGD-20 {_pct(row.pgd20)} "
                      f"AA {_pct(row.autoattack)} params {_pct(row.kept_params)} FLOPs {_pct(row.kept_flops)} "
                      f"({row.seconds or 0:.0f} s) {row.note}", flush=True)
    print(_write(args.out, opts, rows, _meta(args, argv, setup, cached, begin, partial=False)))
    return 0


def _meta(args: argparse.Namespace, argv: list[str] | None, setup: Setup, cached: bool, begin: float,
          partial: bool) -> dict[str, Any]:
    given = sys.argv[1:] if argv is None else argv
    return {
        "command": "python benchmarks/robust_pruning.py" + ("".join(" " + a for a in given)),
        "device": setup.opts.device, "threads": args.threads, "dense_cached": cached, "partial": partial,
        "total_minutes": (time.perf_counter() - begin) / 60,
        "train_samples": len(setup._loaders()[0].dataset), "test_samples": len(setup._loaders()[1].dataset),
        "eval_n": sum(len(x) for x, _ in setup.test_batches), "aa_n": sum(len(x) for x, _ in setup.aa_batches),
        "torch": torch.__version__, "timm": timm.__version__,
    }


def _write(out_stem: str, opts: Options, rows: list[Row], meta: dict[str, Any]) -> str:
    """Render and write the .md and .json (atomically); after every row, so a stopped run leaves
    its finished rows (marked partial)."""
    text = render(opts, rows, meta)
    out = Path(out_stem)
    payload = {"options": asdict(opts), "meta": meta, "rows": [asdict(r) for r in rows]}
    write_atomic(out.with_suffix(".json"), json.dumps(payload, indent=1, default=_json_default) + "\n")
    write_atomic(out.with_suffix(".md"), text)
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
