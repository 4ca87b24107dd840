"""AutoAttack (Croce & Hein, 2020) as implemented by the ``torchattacks`` library.

Versions (pass one as ``version``; :data:`AUTOATTACK_VERSIONS` lists them):

- ``'standard'`` — ``torchattacks.AutoAttack(version='standard')``: APGD-CE, APGD-T (targeted
  DLR), FAB-T and Square (5000 queries), each attacking the points the previous ones left
  correctly classified. The number to report. Note: torchattacks runs APGD, APGD-T and FAB with
  10 iterations each (the reference AutoAttack uses 100), so it is cheaper and can be somewhat
  weaker than the reference implementation.
- ``'plus'``, ``'rand'`` — torchattacks' other AutoAttack versions, passed through.
- ``'apgd-ce'`` — ``torchattacks.APGD(loss='ce')`` alone: the first member of ``'standard'``;
  quick, for tests, smoke runs and the command line's fast mode.
- ``'apgd-ce+apgd-t'`` — ``torchattacks.MultiAttack`` of APGD-CE and APGD-T: the two
  gradient-based members of ``'standard'``, without the slower FAB-T and Square.

Workarounds for torchattacks 3.5.1 (checked on torch 2.15, CPU), applied by
:func:`autoattack_examples` instead of patching the library:

- APGD, APGD-T, FAB and Square call ``torch.random.manual_seed(seed)`` (and the CUDA variant),
  which resets the caller's global random state; the attack runs inside
  ``torch.random.fork_rng`` so the caller's RNG streams are untouched.
- FAB computes input gradients with ``.backward()``, which also accumulates into every
  parameter's ``.grad``; parameters are frozen (``requires_grad=False``) while it runs.
- torchattacks restores only the top-level ``model.train()`` flag; we put the model in eval mode
  ourselves and restore each submodule's own flag.
- The attacks run on the module inside ``DataParallel`` / ``DistributedDataParallel``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchattacks
from torch import Tensor, nn

from ._model_state import eval_mode, frozen_parameters, unwrap_parallel
from .attacks import check_inputs
from .config import AttackConfig
from .errors import AutoAttackError, UnknownNameError

__all__ = ["AUTOATTACK_VERSIONS", "build_autoattack", "autoattack_examples"]

logger = logging.getLogger(__name__)

_Builder = Callable[[nn.Module, AttackConfig, int, int], torchattacks.attack.Attack]


@dataclass(frozen=True)
class _Version:
    build: _Builder
    min_classes: int  # DLR losses read the 3rd (APGD-DLR) / 4th (APGD-T) largest logit


_VERSIONS: dict[str, _Version] = {}


def _register(name: str, min_classes: int) -> Callable[[_Builder], _Builder]:
    def decorate(build: _Builder) -> _Builder:
        _VERSIONS[name] = _Version(build=build, min_classes=min_classes)
        return build

    return decorate


@_register("standard", min_classes=4)
def _standard(model: nn.Module, attack: AttackConfig, n_classes: int, seed: int) -> torchattacks.attack.Attack:
    return torchattacks.AutoAttack(
        model, norm=attack.torchattacks_norm, eps=attack.eps, version="standard",
        n_classes=n_classes, seed=seed,
    )


@_register("plus", min_classes=4)
def _plus(model: nn.Module, attack: AttackConfig, n_classes: int, seed: int) -> torchattacks.attack.Attack:
    return torchattacks.AutoAttack(
        model, norm=attack.torchattacks_norm, eps=attack.eps, version="plus",
        n_classes=n_classes, seed=seed,
    )


@_register("rand", min_classes=3)
def _rand(model: nn.Module, attack: AttackConfig, n_classes: int, seed: int) -> torchattacks.attack.Attack:
    return torchattacks.AutoAttack(
        model, norm=attack.torchattacks_norm, eps=attack.eps, version="rand",
        n_classes=n_classes, seed=seed,
    )


@_register("apgd-ce", min_classes=2)
def _apgd_ce(model: nn.Module, attack: AttackConfig, n_classes: int, seed: int) -> torchattacks.attack.Attack:
    return torchattacks.APGD(model, norm=attack.torchattacks_norm, eps=attack.eps, loss="ce", seed=seed)


@_register("apgd-ce+apgd-t", min_classes=4)
def _apgd_ce_t(model: nn.Module, attack: AttackConfig, n_classes: int, seed: int) -> torchattacks.attack.Attack:
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=attack.torchattacks_norm, eps=attack.eps, loss="ce", seed=seed),
        torchattacks.APGDT(model, norm=attack.torchattacks_norm, eps=attack.eps, n_classes=n_classes, seed=seed),
    ])


AUTOATTACK_VERSIONS: tuple[str, ...] = tuple(_VERSIONS)


def build_autoattack(
    model: nn.Module, attack: AttackConfig, n_classes: int, version: str = "standard", seed: int = 0
) -> torchattacks.attack.Attack:
    """The torchattacks attack object for ``version``; only ``attack.norm`` and ``attack.eps`` are used.

    Run it through :func:`autoattack_examples`, which applies the workarounds listed in this
    module's docstring.
    """
    if version not in _VERSIONS:
        raise UnknownNameError("AutoAttack version", version, AUTOATTACK_VERSIONS)
    entry = _VERSIONS[version]
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < entry.min_classes:
        raise AutoAttackError(
            f"AutoAttack version {version!r} needs n_classes >= {entry.min_classes} (its DLR loss "
            f"compares the largest logits), got n_classes={n_classes!r}; use version='apgd-ce' "
            f"for models with fewer classes"
        )
    return entry.build(model, attack, n_classes, int(seed))


def _rng_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def autoattack_examples(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    n_classes: int,
    version: str = "standard",
    seed: int = 0,
) -> Tensor:
    """Adversarial examples for ``(x, y)`` from AutoAttack ``version``, within ``attack.eps``.

    The model runs in eval mode with frozen parameters; its modes, ``requires_grad`` flags,
    ``.grad`` tensors and the caller's global RNG state are as before when this returns.
    """
    check_inputs(x, y)
    net = unwrap_parallel(model)
    x = x.detach()
    with frozen_parameters(net), eval_mode(net), torch.random.fork_rng(devices=_rng_devices()):
        adversary = build_autoattack(net, attack, n_classes, version=version, seed=seed)
        # torchattacks takes its device from the model; keep the batch where the model is.
        x_adv = adversary(x, y.detach()).detach().to(x.device)
    if x_adv.shape != x.shape:
        raise AutoAttackError(
            f"torchattacks returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}"
        )
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if attack.norm == "linf" else delta.norm(p=2, dim=1)
    worst = float(size.max()) if size.numel() else 0.0
    if worst > attack.eps * (1 + 1e-4) + 1e-6:
        raise AutoAttackError(
            f"AutoAttack {version!r} returned a perturbation of {attack.norm} size {worst:.6g} > "
            f"eps={attack.eps:.6g}; this is a torchattacks bug, results would be invalid"
        )
    return x_adv
