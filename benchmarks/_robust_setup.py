"""The data, attacks, training loops and dense model one (model, seed) of
benchmarks/robust_pruning.py shares; also what the pruning methods see (not a package API)."""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import nni
import timm
import torch
from _robust_methods import LatencyPlan, Structure
from _robust_options import Grid, Options
from _robust_report import Row
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from nni_harp._io import atomic_save
from nni_harp.adversarial import (
    AttackConfig,
    evaluate_robustness,
    make_adversarial_loss,
    training_step_for,
    with_normalization,
)
from nni_harp.data import build_datasets, drops_last_batch
from nni_harp.data.digits import build_digits

_ROOT = Path(__file__).resolve().parent.parent
#: Training images whose PGD-10 accuracy selects the dense model's checkpoint.
SELECT_SAMPLES = 256
#: Alternating rounds of timing the dense and the pruned model (``--latency-reps`` runs per median;
#: each model's lowest median is kept: the one least disturbed by other work on the machine).
LATENCY_ROUNDS = 3
#: What cached cells depend on (the report's rendering is left out: re-rendering keeps the cache).
# what a cell's result depends on: the packages the benchmark imports (not the pipeline, the command
# line or the NNI trial, so work on those keeps the cached cells) and the benchmark itself
_SOURCES = ("nni_harp/__init__.py", "nni_harp/_io.py", "nni_harp/pruning", "nni_harp/adversarial", "nni_harp/data",
            "graph_passes", "benchmarks/robust_pruning.py", "benchmarks/_robust_methods.py",
            "benchmarks/_robust_options.py", "benchmarks/_robust_setup.py", "benchmarks/_common.py")


class Setup:
    """The data, attacks and training loops one (model, seed) shares; also what methods see."""

    def __init__(self, opts: Options, grid: Grid, seed: int) -> None:
        opts = opts.resolved()
        self.opts, self.grid, self.seed = opts, grid, seed
        self.device = torch.device(opts.device)
        self.finetune_lr = opts.finetune_lr
        if opts.dataset == "digits":
            self.train_set, test_set, self.info = build_digits(None, grid.image_size, seed, opts.test_fraction)
        else:
            self.train_set, test_set, self.info = build_datasets(opts.dataset, opts.data_dir, grid.image_size, seed)
        self.test_batches = _take(DataLoader(test_set, batch_size=opts.eval_batch_size), opts.eval_samples)
        self.aa_batches = self.test_batches if opts.aa_samples is None else _take(self.test_batches, opts.aa_samples)
        self.example = self.test_batches[0][0][:2].to(self.device)
        self.train_steps_per_epoch = math.ceil(len(self.train_set) / opts.batch_size)  # type: ignore[arg-type]
        steps = opts.train_attack_steps
        self.train_attack = AttackConfig(eps=opts.eps, step_size=2.5 * opts.eps / steps, steps=steps)
        self.eval_attack = AttackConfig(eps=opts.eps, step_size=2.5 * opts.eps / 20, steps=20)
        self.step = training_step_for(make_adversarial_loss("pgd", self.train_attack))
        self._structure: Structure | None = None
        self._dense: nn.Module | None = None
        self._latency: LatencyPlan | None = None

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        net = timm.create_model(self.grid.model, num_classes=self.info.num_classes)
        return with_normalization(net, self.info.mean, self.info.std).to(self.device)

    def train_loader(self, order: int | None = None) -> DataLoader:
        """A fresh loader: the same batch order for every method of this seed (``order``: another one);
        the last, partial batch left out as the pipeline leaves it out (``--keep-last-batch``)."""
        seed = self.seed if order is None else order
        sampler = RandomSampler(self.train_set, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
        size = len(self.train_set)  # type: ignore[arg-type]
        drop = not self.opts.keep_last_batch and drops_last_batch(size, self.opts.batch_size)
        return DataLoader(self.train_set, batch_size=self.opts.batch_size, sampler=sampler, drop_last=drop)

    def training_func(self, order: int | None = None) -> Callable[..., None]:
        """A TorchEvaluator training function: passes over a fresh train loader (batch order
        ``order``, default the seed's), honouring max_steps and max_epochs (max_steps alone runs as
        many epochs as it takes)."""
        loader, device = self.train_loader(order), self.device

        def training_func(model: nn.Module, optimizers: Any, training_step: Callable[..., torch.Tensor],
                          lr_schedulers: Any = None, max_steps: int | None = None, max_epochs: int | None = None) -> None:
            epochs = max_epochs if max_epochs is not None else (
                math.ceil(max_steps / len(loader)) if max_steps is not None else 1)
            scheds = [] if lr_schedulers is None else (
                list(lr_schedulers) if isinstance(lr_schedulers, (list, tuple)) else [lr_schedulers])
            steps = 0
            for _ in range(epochs):
                model.train()
                for x, y in loader:
                    optimizers.zero_grad()
                    training_step((x.to(device), y.to(device)), model).backward()
                    optimizers.step()
                    steps += 1
                    if max_steps is not None and steps >= max_steps:
                        return
                for sched in scheds:
                    sched.step()

        return training_func

    def evaluator(self, model: nn.Module, lr: float) -> Any:
        """An NNI TorchEvaluator over the adversarial training step, with a traced SGD as README shows."""
        from nni.compression import TorchEvaluator

        optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=lr, momentum=0.9)
        return TorchEvaluator(self.training_func(), optimizer, self.step, dummy_input=self.example)

    def adversarial_training(self, model: nn.Module, epochs: int, lr: float, ramp: float = 0.0,
                             select_every: int = 0, optimizer_name: str = "sgd", keep_start: bool = False,
                             order: int | None = None) -> int:
        """PGD-AT: SGD (momentum 0.9) or Adam, weight decay 5e-4, cosine over ``epochs``. For training from scratch,
        eps grows linearly over the first ``ramp`` of the epochs, and with ``select_every > 0`` the
        model's PGD-10 accuracy on the first :data:`SELECT_SAMPLES` training images is measured every
        ``select_every`` epochs after the ramp (and at the end) and the best checkpoint is kept: a
        guard against epochs that end in a dip (training on the last, partial batch of 2 images,
        ``--keep-last-batch yes``, made such dips common: see :meth:`train_loader`). ``keep_start``
        also makes the model as it came in a candidate. ``order``: the batch order
        (:meth:`train_loader`). Returns the number of epochs the kept model was trained for."""
        if epochs < 1:
            return 0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = (torch.optim.Adam(params, lr=lr, weight_decay=5e-4) if optimizer_name == "adam" else
                     torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        train = self.training_func(order)
        ramp_epochs = round(ramp * epochs)
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        if select_every and keep_start:
            best = (self._selection_accuracy(model), 0, copy.deepcopy(model.state_dict()))
        for epoch in range(epochs):
            step = self.step
            if epoch + 1 < ramp_epochs:
                eps = self.opts.eps * (epoch + 1) / ramp_epochs
                step = training_step_for(make_adversarial_loss(
                    "pgd", replace(self.train_attack, eps=eps, step_size=2.5 * eps / self.train_attack.steps)))
            train(model, optimizer, step, scheduler, max_epochs=1)
            if select_every and epoch + 1 >= ramp_epochs and (epochs - 1 - epoch) % select_every == 0:
                accuracy = self._selection_accuracy(model)
                if best is None or accuracy >= best[0]:
                    best = (accuracy, epoch + 1, copy.deepcopy(model.state_dict()))
        if best is None:
            return epochs
        model.load_state_dict(best[2])
        return best[1]

    def _selection_accuracy(self, model: nn.Module) -> float:
        x, y = next(iter(DataLoader(self.train_set, batch_size=SELECT_SAMPLES)))
        attack = replace(self.eval_attack, step_size=2.5 * self.opts.eps / 10, steps=10)
        return evaluate_robustness(model, [(x, y)], attack, autoattack=False).pgd

    def finetune(self, model: nn.Module, row: Row, repeat: int = 0) -> None:
        """Record the pruned model's clean and PGD-20 accuracy, then fine-tune it (PGD-AT,
        ``--finetune-epochs``) keeping the best of it and its checkpoints (``--finetune-select-every``).

        ``repeat`` > 0 fine-tunes with its own randomness (``--finetune-repeats``): the global torch
        seed (attack starts) and the batch order both ``1000 * repeat + seed``; repeat 0 continues
        the cell's torch state with the seed's batch order."""
        order = None
        if repeat:
            order = 1000 * repeat + self.seed
            torch.manual_seed(order)
        model.eval()
        before = evaluate_robustness(model, self.test_batches, self.eval_attack, autoattack=False)
        row.pre_clean, row.pre_pgd20 = before.clean, before.pgd
        row.ft_epoch = self.adversarial_training(model, self.opts.finetune_epochs, self.opts.finetune_lr,
                                                 select_every=self.opts.finetune_select_every, keep_start=True,
                                                 order=order)

    def evaluate(self, model: nn.Module, row: Row) -> Row:
        """Clean and PGD-20 accuracy on the evaluation samples, AutoAttack (``opts.autoattack``) on
        the AA samples; robust = the lower of PGD-20 and AutoAttack."""
        start = time.perf_counter()
        model.eval()
        if self.aa_batches is self.test_batches:
            both = evaluate_robustness(model, self.test_batches, self.eval_attack, autoattack=True,
                                       autoattack_version=self.opts.autoattack, seed=self.seed)
            row.clean, row.pgd20, row.autoattack = both.clean, both.pgd, both.autoattack
        else:
            report = evaluate_robustness(model, self.test_batches, self.eval_attack, autoattack=False)
            aa = evaluate_robustness(model, self.aa_batches, self.eval_attack, autoattack=True,
                                     autoattack_version=self.opts.autoattack, seed=self.seed)
            row.clean, row.pgd20, row.autoattack = report.clean, report.pgd, aa.autoattack
        row.robust = min(row.pgd20, row.autoattack)  # type: ignore[type-var]
        row.eval_n = sum(len(x) for x, _ in self.test_batches)
        row.aa_n = sum(len(x) for x, _ in self.aa_batches)
        row.eval_s = time.perf_counter() - start
        return row

    # -- the dense model
    def dense_path(self, cache: Path) -> Path:
        text = json.dumps(self.opts.dense_fields() | {"model": self.grid.model, "size": self.grid.image_size,
                                                      "seed": self.seed, "src": _dense_fingerprint()}, sort_keys=True)
        return cache / "dense" / f"{self.grid.tag}_s{self.seed}_{hashlib.sha256(text.encode()).hexdigest()[:12]}.pt"

    def dense(self, cache: Path) -> nn.Module:
        """The PGD-AT dense model of this seed (trained once, then read from the cache)."""
        if self._dense is None:
            path = self.dense_path(cache)
            model = self.new_model()
            if path.exists():
                model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
            else:
                torch.manual_seed(self.seed)
                self.adversarial_training(model, self.opts.pretrain_epochs, self.opts.pretrain_lr,
                                          self.opts.pretrain_eps_ramp, self.opts.pretrain_select_every,
                                          self.opts.pretrain_optimizer)
                atomic_save(model.state_dict(), path)
            self._dense = model.eval()
        return self._dense

    @property
    def structure(self) -> Structure:
        if self._structure is None:
            if self._dense is None:
                raise RuntimeError("Setup.structure needs the dense model: call dense() first")
            self._structure = Structure(self._dense, self.example)
        return self._structure


    # -- the latency setting
    def latency(self, cache: Path) -> LatencyPlan:
        """The latency model of this model on ``--latency-backend`` / ``--latency-threads`` at one
        image, refined for ``--latency-target`` as the latency-budget pruner refines it (fitted
        once: cached under ``cache/latency``, where the pruner reads it), with the channel groups
        and cost model of that trace."""
        if self._latency is None:
            import graph_passes as gp
            from nni_harp.pruning import HARPSettings
            from nni_harp.pruning._latency import latency_for_target

            settings = HARPSettings(budget="latency", latency_backend=self.opts.latency_backend,
                                    latency_threads=self.opts.latency_threads, latency_cache=str(cache / "latency"))
            model = self._dense if self._dense is not None else self.new_model().eval()  # the weights do not matter
            example = self.example[:1]
            analysis = gp.analysis_for(model, (example,))
            fitted = latency_for_target(analysis, example, settings, self.grid.latency)
            self._latency = LatencyPlan(example, settings, fitted, list(analysis.groups), gp.cost(analysis))
        return self._latency

    @property
    def latency_plan(self) -> LatencyPlan:
        if self._latency is None:
            raise RuntimeError("Setup.latency_plan needs the latency model: call latency(cache) first")
        return self._latency

    def measure_latency(self, dense: nn.Module, pruned: nn.Module) -> tuple[float, float, float]:
        """``(pruned / dense, dense ms, pruned ms)`` measured now on the latency model's backend,
        threads and input, as the pipeline measures its latency budget
        (``nni_harp.pipeline._latency.measure_budget``): :data:`LATENCY_ROUNDS` alternating medians of
        ``--latency-reps`` runs each, the lowest of each model's kept."""
        from nni_harp.pipeline._latency import measure_budget

        got = measure_budget(dense, pruned, self.latency_plan.example, self.opts.latency_backend,
                             self.opts.latency_threads, self.opts.latency_reps, rounds=LATENCY_ROUNDS)
        return got["measured"], got["dense_ms"], got["pruned_ms"]


class LatencyTargetError(ValueError):
    """``--latency-target`` is below what HARP can reach on the backend, per the latency model."""


def check_latency_target(opts: Options, grid: Grid, cache: Path) -> float:
    """The lowest latency fraction HARP can reach on ``grid``'s model (:meth:`LatencyPlan.lowest`,
    fitting the latency model if it is not cached); raises :class:`LatencyTargetError` naming
    ``--latency-target`` when the target is below it, before anything trains."""
    target = grid.latency
    if target is None:
        raise ValueError(f"grid {grid.tag} has no latency setting")
    plan = Setup(opts, grid, grid.seeds[0]).latency(cache)
    lowest = plan.lowest(target)
    if lowest > target:
        raise LatencyTargetError(
            f"--latency-target {target:g} cannot be met by {grid.model} at {grid.image_size} px on "
            f"{opts.latency_backend} with {opts.latency_threads} thread(s): the latency model predicts x{lowest:.3f} of "
            "the dense latency with every prunable channel group at HARP's floor (the rest is time no channel removal "
            f"saves: fixed cost per run and per op, unprunable layers); choose a --latency-target above {lowest:.2f}, "
            "a larger --image-size, or another --latency-backend")
    return lowest


def _take(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``limit`` samples of (unshuffled) batches, as a fixed list."""
    out, seen = [], 0
    for x, y in batches:
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + len(x) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        out.append((x, y))
        seen += len(x)
    return out


def source_fingerprint(entries: Iterable[str] = _SOURCES, code: Iterable[Callable[..., Any]] = ()) -> str:
    """A hash of the source files (or folders) ``entries``, of the functions ``code`` and of the
    library versions: cached results are reused only while all of them are unchanged."""
    digest = hashlib.sha256()
    for entry in entries:
        path = _ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(_ROOT)).encode())
            digest.update(file.read_bytes())
    for fn in code:
        digest.update(inspect.getsource(fn).encode())
    import nni as _nni
    import torch_pruning
    import torchattacks

    for mod in (torch, timm, _nni, torchattacks, torch_pruning):
        digest.update(f"{mod.__name__}={getattr(mod, '__version__', '?')}".encode())
    return digest.hexdigest()[:12]


def _dense_fingerprint() -> str:
    """What the dense model depends on: the attacks and data packages and the code that trains it
    (not HARP's or the benchmark's other code, so editing those keeps the cached dense models)."""
    return source_fingerprint(("nni_harp/adversarial", "nni_harp/data"),
                              (Setup.__init__, Setup.new_model, Setup.train_loader, Setup.training_func,
                               Setup.adversarial_training, Setup._selection_accuracy, Setup.dense))
