"""The pruning methods of benchmarks/robust_pruning.py, one registry entry each (not a package API).

Every method turns a copy of the dense, adversarially trained model into a pruned one for one
setting: NNI-format masks (fine-tuned with the masks fixed) or a physically smaller model
(Torch-Pruning). What the runner does before and after (fine-tuning, speedup, evaluation) is the
same for every method.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from _common import n_flops
from torch import nn

import graph_passes as gp

Masks = dict[str, dict[str, torch.Tensor]]
MODES = ("unstructured", "structured")
#: The latency setting's mode: structured pruning whose cell target is the fraction of the dense
#: latency kept (see :class:`LatencyPlan`); only the methods registered for it run there.
LATENCY = "latency"


def removes_channels(mode: str) -> bool:
    """Whether a mode's pruned models lose whole channels (and are physically pruned)."""
    return mode in ("structured", LATENCY)


class Context(Protocol):
    """What a method may use from the runner (see ``robust_pruning.Setup``)."""

    device: torch.device
    example: torch.Tensor
    train_steps_per_epoch: int
    finetune_lr: float

    @property
    def structure(self) -> Structure: ...

    @property
    def latency_plan(self) -> LatencyPlan: ...

    def evaluator(self, model: nn.Module, lr: float) -> Any: ...


@dataclass
class Pruned:
    """A method's result: masks on the model it was given, or a smaller model."""

    masks: Masks | None = None
    small: nn.Module | None = None
    rates: dict[str, float] = field(default_factory=dict)  # HARP/HYDRA: kept fraction per unit
    history: list[dict[str, Any]] = field(default_factory=list)  # HARP/HYDRA: pruner.history
    frozen_at: int | None = None  # HARP: epoch at which gamma froze
    budget_target: float | None = None  # latency setting: the kept fraction the pruner's budget was given
    budget_kind: str | None = None  # ... of what: 'latency' or 'FLOPs'


#: ``prune(ctx, model, mode, target, prune_epochs, prior_alloc) -> Pruned``; ``target`` is the
#: unstructured sparsity or the structured fraction of FLOPs removed.
PruneFn = Callable[[Context, nn.Module, str, float, int, "dict[str, int] | None"], Pruned]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    modes: tuple[str, ...]
    prune: PruneFn
    learns: bool = False  # spends the pruning epochs (HARP, HYDRA, Movement)
    needs: str | None = None  # the method whose result (its allocation) this one reads
    why_not: str = ""  # why it is not run in the other mode


METHODS: dict[str, Method] = {}


def register(name: str, label: str, modes: tuple[str, ...], *, learns: bool = False, needs: str | None = None,
             why_not: str = "") -> Callable[[PruneFn], PruneFn]:
    def decorate(fn: PruneFn) -> PruneFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, label, modes, fn, learns, needs, why_not)
        return fn

    return decorate


def prunable_layers(model: nn.Module) -> list[str]:
    """The layers every method prunes: every Conv2d and Linear."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ------------------------------------------------------------------------------ unstructured
def _top_count_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), device=score.device)
    mask[torch.topk(score.flatten(), max(0, min(count, score.numel()))).indices] = 1.0
    return mask.view_as(score)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach() for n in prunable_layers(model)}


def _global_top(scores: dict[str, torch.Tensor], sparsity: float) -> Masks:
    """Keep the ``1 - sparsity`` highest scores over all layers together."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = max(1, round((1 - sparsity) * flat.numel()))
    chosen = torch.zeros(flat.numel(), device=flat.device)
    chosen[torch.topk(flat, keep).indices] = 1.0
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = {"weight": chosen[start:start + s.numel()].view_as(s)}
        start += s.numel()
    return masks


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al., ICLR 2021) of one layer: with the squared weights sorted ascending,
    ``w_u^2 / sum_{v >= u} w_v^2``. The layer's largest weight scores 1, so a global threshold on
    LAMP scores never empties a layer."""
    sq = weight.detach().flatten().double() ** 2
    order = torch.argsort(sq)
    ranked = sq[order]
    tail = torch.flip(torch.cumsum(torch.flip(ranked, [0]), 0), [0])  # sum over v >= u
    scores = torch.empty_like(sq)
    scores[order] = ranked / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.view_as(weight).float()


@register("global-mag", "global magnitude", MODES)
def _global_magnitude(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                      prior: dict[str, int] | None) -> Pruned:
    if mode == "unstructured":
        return Pruned(masks=_global_top({n: w.abs() for n, w in _weights(model).items()}, target))
    return Pruned(masks=_structured_magnitude(model, ctx.structure, 1 - target, global_=True))


@register("layer-mag", "layer-wise magnitude", MODES)
def _layer_magnitude(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                     prior: dict[str, int] | None) -> Pruned:
    if mode == "unstructured":
        return Pruned(masks={n: {"weight": _top_count_mask(w.abs(), max(1, round((1 - target) * w.numel())))}
                             for n, w in _weights(model).items()})
    return Pruned(masks=_structured_magnitude(model, ctx.structure, 1 - target, global_=False))


@register("lamp", "LAMP", ("unstructured",), why_not="LAMP ranks single weights (unstructured only)")
def _lamp(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
          prior: dict[str, int] | None) -> Pruned:
    return Pruned(masks=_global_top({n: lamp_scores(w) for n, w in _weights(model).items()}, target))


# ------------------------------------------------------------------- HARP, HYDRA and the ablation
def _harp_like(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int, hydra: bool,
               settings: Any = None, example: torch.Tensor | None = None) -> Pruned:
    """HARPPruner / HydraPruner through the public API with their default settings (or
    ``settings``, a ``HARPSettings``), as a user would call them (README): one global budget over
    every Conv2d/Linear, NNI TorchEvaluator; ``example`` (default ``ctx.example``) is the dummy
    input the pruner traces (and, with a latency budget, fits its latency model at)."""
    from nni_harp import HARPPruner, HydraPruner

    config: dict[str, Any] = {"op_types": ["Conv2d", "Linear"], "sparse_ratio": target, "global_group_id": "all"}
    if mode == "structured":
        config["granularity"] = "out_channel"
    cls = HydraPruner if hydra else HARPPruner
    pruner = cls(model, [config], ctx.evaluator(model, lr=0.01), dummy_input=ctx.example if example is None else example,
                 settings=settings)
    _, masks = pruner.compress(max_steps=None, max_epochs=epochs)
    result = Pruned(masks=_plain_masks(masks), rates=dict(pruner.layer_rates()),
                    history=[_plain(h) for h in getattr(pruner, "history", [])])
    schedule = getattr(pruner, "schedule", None)
    result.frozen_at = None if hydra or schedule is None else schedule.frozen_at
    pruner.unwrap_model()
    return result


@register("harp", "HARP", MODES, learns=True)
def _harp(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
          prior: dict[str, int] | None) -> Pruned:
    return _harp_like(ctx, model, mode, target, epochs, hydra=False)


@register("hydra", "HYDRA", MODES, learns=True)
def _hydra(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
           prior: dict[str, int] | None) -> Pruned:
    return _harp_like(ctx, model, mode, target, epochs, hydra=True)


# ------------------------------------------------------- a latency budget against a FLOPs budget
@dataclass(frozen=True)
class LatencyPlan:
    """What the latency setting plans with: the dense model's :class:`graph_passes.LatencyModel`
    on the benchmark's backend, fitted (and measured) at one image ``example``, with the channel
    groups and cost model of that same trace (the latency model's terms are absolute costs, so
    its cost model must be at the batch it was fitted at)."""

    example: torch.Tensor
    settings: Any  # the HARPSettings of a latency budget (backend, threads, cache of the fit)
    model: Any  # graph_passes.LatencyModel
    groups: list[Any]
    cost: Any  # graph_passes.CostModel

    @property
    def prunable(self) -> list[int]:
        return [g.id for g in self.groups if g.prunable]

    def predicted(self, masks: Masks) -> float:
        """The latency model's fraction of the dense latency for the channels ``masks`` keep."""
        keep = gp.keep_from_masks(self.groups, masks)
        return float(self.model.fraction(self.cost, {g: float(keep[g].float().mean()) for g in self.prunable}))

    def lowest(self, target: float) -> float:
        """The lowest fraction HARP can reach at latency ``target`` per the latency model: every
        prunable group at its floor (``alpha * target`` of its channels, at least one)."""
        from nni_harp.pruning.budget import lowest_latency

        return lowest_latency(self.cost, self.groups, self.model, self.settings.alpha * target)

    def matched_flops(self, target: float) -> tuple[float, float]:
        """The FLOPs budget aimed at latency ``target``: the channel fraction ``u`` which, kept in
        every prunable group, the latency model predicts at ``target`` of the dense latency
        (``nni_harp.pruning.budget.uniform_keep``), and that uniform plan's kept FLOPs."""
        from nni_harp.pruning.budget import uniform_keep

        u = uniform_keep(self.cost, self.prunable, target, self.model)
        return u, float(self.cost.flops(dict.fromkeys(self.prunable, u))) / float(self.cost.total_flops)


@register("harp-latency", "HARP, latency budget", (LATENCY,), learns=True,
          why_not="a latency budget runs in the latency setting only (--latency-target)")
def _harp_latency(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                  prior: dict[str, int] | None) -> Pruned:
    """HARP with default settings but ``budget='latency'``: it keeps ``target`` of the dense
    latency the benchmark's latency model predicts (fitted at one image, read from its cache)."""
    plan = ctx.latency_plan
    pruned = _harp_like(ctx, model, "structured", 1 - target, epochs, hydra=False, settings=plan.settings,
                        example=plan.example)
    pruned.budget_target, pruned.budget_kind = target, "latency"
    return pruned


@register("harp-flops-matched", "HARP, FLOPs budget at the same latency", (LATENCY,), learns=True,
          why_not="the FLOPs budget matched to a latency runs in the latency setting only (--latency-target)")
def _harp_flops_matched(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                        prior: dict[str, int] | None) -> Pruned:
    """HARP with default settings (its FLOPs budget) at the FLOPs fraction of the uniform plan the
    latency model predicts at ``target`` of the dense latency (:meth:`LatencyPlan.matched_flops`)."""
    _, flops = ctx.latency_plan.matched_flops(target)
    pruned = _harp_like(ctx, model, "structured", 1 - flops, epochs, hydra=False)
    pruned.budget_target, pruned.budget_kind = flops, "FLOPs"
    return pruned


def allocation(masks: Masks, mode: str, structure: Structure) -> dict[str, int]:
    """Kept entries per unit of final masks: weights per layer (unstructured) or channels per
    prunable channel group (structured, keyed by group id)."""
    if mode == "unstructured":
        return {name: int((m["weight"] != 0).sum()) for name, m in masks.items() if "weight" in m}
    return {str(gid): int(k.sum()) for gid, k in structure.keep_from_producers(masks).items()}


@register("harp-alloc-mag", "HARP's allocation + magnitude scores", MODES, needs="harp")
def _harp_allocation_magnitude(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                               prior: dict[str, int] | None) -> Pruned:
    """The ablation: HARP's kept count per layer (per channel group) with the highest-magnitude
    weights (highest-L2 channels) in each, so the value of the learned rates shows on its own."""
    if prior is None:
        raise ValueError("harp-alloc-mag needs HARP's allocation for the same setting and seed")
    if mode == "unstructured":
        return Pruned(masks={n: {"weight": _top_count_mask(w.abs(), prior.get(n, w.numel()))}
                             for n, w in _weights(model).items()})
    st = ctx.structure
    keep = {}
    for g in st.prunable:
        norms = gp.channel_norms(model, g).detach()
        keep[g.id] = _top_count_mask(norms, prior.get(str(g.id), g.size)).bool()
    return Pruned(masks=gp.group_masks(model, st.prunable, keep))


# ------------------------------------------------------------------------------- NNI pruners
def _plain(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}


def _plain_masks(masks: dict[str, dict[str, torch.Tensor | None]]) -> Masks:
    return {m: {p: t.detach() for p, t in d.items() if t is not None} for m, d in masks.items()}


@register("nni-movement", "NNI MovementPruner", ("unstructured",), learns=True,
          why_not="MovementPruner scores single weights (unstructured only)")
def _nni_movement(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                  prior: dict[str, int] | None) -> Pruned:
    """NNI's MovementPruner, per weight, one global budget: it fine-prunes (weights train with the
    adversarial loss, fine-tuning lr) for the pruning epochs, sparsity ramped (cubic) from 10 % to
    70 % of the steps, as NNI's tutorial does."""
    from nni.compression.pruning import MovementPruner

    config = [{"op_types": [op], "sparse_ratio": target, "global_group_id": "all", "granularity": [1] * dims}
              for op, dims in (("Conv2d", 4), ("Linear", 2))]
    total = max(2, epochs * ctx.train_steps_per_epoch)
    warmup = max(0, total // 10)
    pruner = MovementPruner(model, config, ctx.evaluator(model, lr=ctx.finetune_lr), warmup_step=warmup,
                            cooldown_begin_step=max(warmup + 1, (7 * total) // 10))
    _, masks = pruner.compress(max_steps=total, max_epochs=None)
    pruner.unwrap_model()
    return Pruned(masks={n: {"weight": m["weight"]} for n, m in _plain_masks(masks).items() if "weight" in m})


def _nni_channel_pruner(ctx: Context, model: nn.Module, keep_flops: float,
                        make: Callable[[nn.Module, float], Any]) -> Masks:
    """An NNI output-channel pruner at the uniform ratio whose FLOPs meet ``keep_flops``
    (bisection); like NNI's own speedup, a channel of a coupled group goes only if every producer
    drops it."""
    st = ctx.structure

    def keep_for(ratio: float) -> dict[int, torch.Tensor]:
        trial = copy.deepcopy(model)
        torch.manual_seed(0)
        pruner = make(trial, ratio)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        return st.keep_from_producers(_plain_masks(masks))

    ratio = bisect(lambda r: st.flops_of_keep(keep_for(r)), keep_flops, hi=0.99, steps=12)
    return gp.group_masks(model, st.prunable, keep_for(ratio))


@register("nni-l1", "NNI L1NormPruner", ("structured",),
          why_not="L1NormPruner ranks output channels by L1 norm (structured only)")
def _nni_l1(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
            prior: dict[str, int] | None) -> Pruned:
    from nni.compression.pruning import L1NormPruner

    return Pruned(masks=_nni_channel_pruner(
        ctx, model, 1 - target, lambda m, r: L1NormPruner(m, [{"op_types": ["Conv2d"], "sparse_ratio": r}])))


@register("nni-taylor", "NNI TaylorPruner", ("structured",),
          why_not="TaylorPruner ranks output channels (structured only)")
def _nni_taylor(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                prior: dict[str, int] | None) -> Pruned:
    """NNI's TaylorPruner (first-order Taylor importance of output channels) with the gradients of
    the adversarial loss over one training epoch, collected with a zero learning rate so the
    weights stay those of the dense model (all fine-tuning happens afterwards, as for every method)."""
    from nni.compression.pruning import TaylorPruner

    steps = ctx.train_steps_per_epoch
    return Pruned(masks=_nni_channel_pruner(
        ctx, model, 1 - target,
        lambda m, r: TaylorPruner(m, [{"op_types": ["Conv2d"], "sparse_ratio": r}], ctx.evaluator(m, lr=0.0),
                                  training_steps=steps)))


# ---------------------------------------------------------------------------- Torch-Pruning
@register("torch-pruning", "Torch-Pruning group magnitude", ("structured",),
          why_not="Torch-Pruning removes whole channels (structured only)")
def _torch_pruning(ctx: Context, model: nn.Module, mode: str, target: float, epochs: int,
                   prior: dict[str, int] | None) -> Pruned:
    """Torch-Pruning's MagnitudePruner (group L2 importance, one ratio for every layer, the
    classifier kept), the ratio found by bisection on the FLOPs of the pruned model."""
    import torch_pruning as tp

    dense = n_flops(model, ctx.example)
    classifier = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]

    def pruned(ratio: float) -> nn.Module:
        trial = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(trial, ctx.example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio,
                                           ignored_layers=[trial.get_submodule(n) for n in classifier])
        pruner.step()
        return trial

    ratio = bisect(lambda r: n_flops(pruned(r), ctx.example) / dense, 1 - target, hi=0.99, steps=14)
    return Pruned(small=pruned(ratio))


# ------------------------------------------------------------------ structured magnitude helpers
class Structure:
    """Channel groups and cost model of the dense model, for the structured baselines."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.groups = list(gp.channel_groups(model, (example,)))
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
                rows = mask.detach().cpu().index_select(m.dim, torch.tensor(m.index)).movedim(m.dim, 0)
                kept[torch.tensor(m.channel)[(rows.reshape(len(m.index), -1) != 0).any(dim=1)]] = True
            keep[g.id] = kept if seen else torch.ones(g.size, dtype=torch.bool)
        return keep

    def flops_of_keep(self, keep: dict[int, torch.Tensor]) -> float:
        return self.flops_kept({gid: float(k.float().mean()) for gid, k in keep.items()})


def bisect(kept: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 1.0, steps: int = 30) -> float:
    """x in [lo, hi] with kept(x) closest to target from below; kept is non-increasing in x."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if kept(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def _structured_magnitude(model: nn.Module, st: Structure, keep_flops: float, global_: bool) -> Masks:
    """Global: one threshold on the L2 norms of every prunable group's channels; layer-wise: every
    group keeps the same fraction of its highest-norm channels; either found by bisection on FLOPs."""
    norms = {g.id: gp.channel_norms(model, g).detach() for g in st.prunable}
    largest = float(max(v.max() for v in norms.values()))

    def keep_vectors(x: float) -> dict[int, torch.Tensor]:
        out = {}
        for g in st.prunable:
            n = norms[g.id]
            if global_:  # x: the fraction of the largest norm below which channels go
                k = n >= x * largest
                if not k.any():
                    k = torch.zeros_like(k)
                    k[n.argmax()] = True
            else:  # x: the fraction of every group's channels removed
                k = _top_count_mask(n, min(g.size, max(1, round((1 - x) * g.size)))).bool()
            out[g.id] = k
        return out

    x = bisect(lambda v: st.flops_of_keep(keep_vectors(v)), keep_flops)
    return gp.group_masks(model, st.prunable, keep_vectors(x))
