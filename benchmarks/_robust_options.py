"""Settings, models and cells of benchmarks/robust_pruning.py (not a package API)."""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from _robust_methods import LATENCY, METHODS

from graph_passes.latency import BACKENDS as LATENCY_BACKENDS
from nni_harp.adversarial import AUTOATTACK_VERSIONS

#: The threat model (L-inf radius on [0, 1] images), picked from the dense models only: see
#: robust_pruning.py's docstring for the measurement.
EPS = 0.12
#: Default ``--cache-dir``: finished cells and the dense models of every seed.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "nni_harp_bench"
#: AutoAttack samples per model on CPU by default (about 0.1-0.2 s a sample on test_resnet, 13x that
#: on resnet18: see robust_pruning.py's docstring, which also shows what 100 samples cannot
#: separate); a GPU run attacks every evaluation sample.
CPU_AA_SAMPLES = 200
#: Whether the CPU default leaves out the large model (see the module docstring for the cost).
CPU_SKIPS_LARGE_MODEL = True


def _opt(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """An Options field: its default, its --help text and (where the type's own is not enough) its parser."""
    return field(default=default, metadata={"help": help, "parse": parse})


def _parse_floats(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must lie in (0, 1), got {text!r}")
    return values


def _parse_eps(text: str) -> float:
    """``0.07`` or ``8/255``: an L-inf radius on images in [0, 1]."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 8/255, got {text!r}") from exc
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"eps is a radius on images in [0, 1] (e.g. 0.07 or 8/255), got {text!r}")
    return value


def _parse_fraction(text: str) -> float | None:
    """``none`` or a fraction in (0, 1)."""
    if text.lower() in ("", "none"):
        return None
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1) or 'none', got {text!r}")
    return value


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _parse_count(text: str) -> int | str | None:
    """``all`` (None), ``auto`` or a positive count."""
    if text.lower() in ("all", "none", "auto"):
        return None if text.lower() != "auto" else "auto"
    return int(text)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"yes or no, got {text!r}")


def _parse_name(text: str) -> str | None:
    return None if text.lower() == "none" else text


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "bool": _parse_bool, "str | None": _parse_name,
    "int | None": _parse_count, "int | str | None": _parse_count, "tuple[float, ...]": _parse_floats,
    "tuple[str, ...]": _parse_names,
}


@dataclass(frozen=True)
class Options:
    """Every setting of the benchmark; the command line is derived from these fields."""

    model: str = _opt("test_resnet", "the model of the full grid (timm name)")
    image_size: int = _opt(16, "its input size")
    large_model: str | None = _opt("auto", "second model, 'none', or 'auto': resnet18 on a GPU, none on CPU "
                                           "(see CPU_SKIPS_LARGE_MODEL)")
    large_image_size: int = _opt(32, "the second model's input size")
    large_unstructured: tuple[float, ...] = _opt((0.99,), "its sparsities")
    large_structured: tuple[float, ...] = _opt((0.75,), "its fractions of FLOPs removed")
    large_seeds: int | None = _opt(None, "its seeds (default: 1 on CPU, --seeds on a GPU)")
    dataset: str = _opt("digits", "digits (embedded), cifar10, svhn, imagefolder")
    data_dir: str | None = _opt(None, "dataset folder (cifar10/svhn/imagefolder)")
    test_fraction: float = _opt(0.5, "digits: the held-out share of every seed's split")
    batch_size: int = _opt(32, "training batch size (pretraining, pruning, fine-tuning)")
    keep_last_batch: bool = _opt(False, "yes: also train on every epoch's last, partial batch (2 images of digits' "
                                        "898), as the runs before 2026-12-02 did; its BatchNorm statistics at 1x1 "
                                        "spatial size made PGD-AT collapse at random epoch ends "
                                        "(nni_harp.data.drops_last_batch)")
    eval_batch_size: int = _opt(256, "evaluation batch size")
    eps: float = _opt(EPS, "L-inf radius on [0, 1] images, e.g. 0.07 or 8/255", _parse_eps)
    train_attack_steps: int = _opt(5, "PGD steps of adversarial training (step 2.5 eps / steps)")
    pretrain_epochs: int = _opt(60, "PGD-AT epochs of the dense model")
    pretrain_optimizer: str = _opt("adam", "adam or sgd (momentum 0.9); SGD at lr 0.05 collapsed on some seeds")
    pretrain_lr: float = _opt(0.002, "its learning rate (cosine)")
    pretrain_eps_ramp: float = _opt(0.3, "share of the pretraining epochs over which eps grows linearly to its value")
    pretrain_select_every: int = _opt(5, "keep the best pretraining checkpoint (PGD-10 on 256 training images) of "
                                         "every N epochs after the ramp; 0: the last")
    prune_epochs: int = _opt(20, "HARP/HYDRA/Movement pruning epochs (the original's 20)")
    short_prune_epochs: int = _opt(3, "the short-schedule row's pruning epochs (0: no such row)")
    short_target: float = _opt(0.9, "the short-schedule row's unstructured sparsity")
    finetune_epochs: int = _opt(5, "PGD-AT fine-tuning epochs of every pruned model")
    finetune_lr: float = _opt(0.01, "their SGD learning rate (cosine)")
    finetune_select_every: int = _opt(1, "keep the best of the pruned model before fine-tuning and the fine-tuning "
                                         "checkpoints of every N epochs (PGD-10 on 256 training images); 0: the last")
    finetune_repeats: int = _opt(1, "fine-tune every pruned model N times, each with its own attack randomness and "
                                    "batch order, and report the means (with the last partial batch trained on, "
                                    "fine-tuning the same pruned model again moved its robust accuracy by 10-26 "
                                    "points (std) in robust_pruning_structured_ft3.md)")
    unstructured: tuple[float, ...] = _opt((0.9, 0.95, 0.99), "sparsities, e.g. 0.9,0.95,0.99")
    structured: tuple[float, ...] = _opt((0.5, 0.75, 0.9), "fractions of FLOPs removed, e.g. 0.5,0.75,0.9")
    latency_target: float | None = _opt(None, "fraction of the dense latency kept in the extra setting 'latency xT "
                                              "(structured)' of --model: harp-latency (HARP, latency budget) against "
                                              "harp-flops-matched (HARP, FLOPs budget aimed at the same latency); "
                                              "none: no such setting", _parse_fraction)
    latency_backend: str = _opt("onnxruntime", f"where that latency is fitted and measured: {', '.join(LATENCY_BACKENDS)}")
    latency_threads: int = _opt(1, "its threads")
    latency_reps: int = _opt(100, "runs per median when measuring a pruned model's latency against the dense one's "
                                  "(3 alternating rounds, the lowest median of each kept)")
    methods: tuple[str, ...] = _opt(tuple(METHODS), f"subset of {','.join(METHODS)}")
    seeds: int = _opt(3, "seeds 0..N-1 (each redraws the split and retrains the dense model)")
    eval_samples: int | None = _opt(None, "clean/PGD-20 samples: N or 'all'")
    aa_samples: int | str | None = _opt("auto", "AutoAttack samples: N, 'all', or 'auto' (all on a GPU, "
                                                "CPU_AA_SAMPLES on CPU)")
    autoattack: str = _opt("standard", "'standard' (full AutoAttack, the number to report); others only for "
                                       "smoke tests")
    device: str = _opt("cpu", "cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        problems = [
            f"unknown method(s) {sorted(set(self.methods) - set(METHODS))}; choose from {list(METHODS)}"
            if set(self.methods) - set(METHODS) else "",
            "" if 0 < self.test_fraction < 1 else f"test_fraction must lie in (0, 1), got {self.test_fraction}",
            "" if 0 < self.eps < 1 else f"eps must lie in (0, 1), got {self.eps}",
            "" if self.autoattack in AUTOATTACK_VERSIONS else f"autoattack must be one of {AUTOATTACK_VERSIONS}",
            "" if self.seeds >= 1 else f"seeds must be >= 1, got {self.seeds}",
            "" if self.finetune_repeats >= 1 else f"finetune_repeats must be >= 1, got {self.finetune_repeats}",
            "" if self.pretrain_optimizer in ("adam", "sgd") else "pretrain_optimizer must be adam or sgd",
            "" if self.latency_target is None or 0 < self.latency_target < 1
            else f"latency_target must lie in (0, 1), got {self.latency_target}",
            "" if self.latency_backend in LATENCY_BACKENDS
            else f"latency_backend must be one of {list(LATENCY_BACKENDS)}, got {self.latency_backend!r}",
            "" if min(self.latency_threads, self.latency_reps) >= 1 else "latency_threads and latency_reps must be >= 1",
            "" if min(self.pretrain_epochs, self.finetune_epochs, self.short_prune_epochs, self.finetune_select_every) >= 0
            and self.prune_epochs >= 1
            else "epochs and finetune_select_every must be >= 0 (prune_epochs >= 1)",
        ]
        if any(problems):
            raise ValueError("; ".join(p for p in problems if p))

    def resolved(self) -> Options:
        """``auto`` values replaced by what this device gets."""
        cpu = torch.device(self.device).type == "cpu"
        large = self.large_model if self.large_model != "auto" else (None if CPU_SKIPS_LARGE_MODEL and cpu else "resnet18")
        aa = self.aa_samples if self.aa_samples != "auto" else (CPU_AA_SAMPLES if cpu else None)
        return replace(self, large_model=large, aa_samples=aa)

    def result_fields(self) -> dict[str, Any]:
        """The options that change a cell's result (not which cells run)."""
        skip = {"model", "image_size", "large_model", "large_image_size", "large_unstructured", "large_structured",
                "large_seeds", "unstructured", "structured", "latency_target", "methods", "seeds", "short_target",
                "prune_epochs", "short_prune_epochs", "device"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["device_type"] = torch.device(self.device).type
        return out

    def dense_fields(self) -> dict[str, Any]:
        keys = ("dataset", "data_dir", "test_fraction", "batch_size", "keep_last_batch", "eps", "train_attack_steps",
                "pretrain_epochs", "pretrain_optimizer", "pretrain_lr", "pretrain_eps_ramp", "pretrain_select_every")
        return {k: getattr(self, k) for k in keys} | {"device_type": torch.device(self.device).type}


@dataclass(frozen=True)
class Grid:
    """One model and the settings it is pruned to."""

    model: str
    image_size: int
    seeds: tuple[int, ...]
    unstructured: tuple[float, ...]
    structured: tuple[float, ...]
    short: bool  # also the short-schedule row
    latency: float | None = None  # also the latency setting: the fraction of the dense latency kept

    @property
    def tag(self) -> str:
        return f"{self.model}_{self.image_size}px"


def grids(opts: Options) -> list[Grid]:
    out = [Grid(opts.model, opts.image_size, tuple(range(opts.seeds)), opts.unstructured, opts.structured,
                opts.short_prune_epochs > 0, opts.latency_target)]
    if opts.large_model:
        n = opts.large_seeds if opts.large_seeds is not None else (1 if torch.device(opts.device).type == "cpu"
                                                                    else opts.seeds)
        out.append(Grid(opts.large_model, opts.large_image_size, tuple(range(n)), opts.large_unstructured,
                        opts.large_structured, False))
    return out


@dataclass(frozen=True)
class Cell:
    grid: Grid
    seed: int
    mode: str
    target: float
    method: str
    prune_epochs: int

    @property
    def key(self) -> str:
        return f"{self.grid.tag}_s{self.seed}_{self.mode}_{self.target:g}_{self.method}_p{self.prune_epochs}"

    def needs(self) -> Cell | None:
        dep = METHODS[self.method].needs
        return None if dep is None else replace(self, method=dep)


def cells(opts: Options) -> list[Cell]:
    """Every cell to run, costliest first (the large model, then the methods that learn)."""
    out = []
    for grid in grids(opts):
        settings = [(m, t, opts.prune_epochs) for m, ts in (("unstructured", grid.unstructured),
                                                            ("structured", grid.structured)) for t in ts]
        if grid.short:
            settings.append(("unstructured", opts.short_target, opts.short_prune_epochs))
        if grid.latency is not None:
            settings.append((LATENCY, grid.latency, opts.prune_epochs))
        for seed in grid.seeds:
            for mode, target, epochs in settings:
                short = epochs != opts.prune_epochs
                for name in opts.methods:
                    method = METHODS[name]
                    if mode in method.modes and (not short or name in ("harp", "hydra", "harp-alloc-mag")):
                        out.append(Cell(grid, seed, mode, target, name, epochs))
    return sorted(out, key=lambda c: (c.grid.model != opts.large_model, not METHODS[c.method].learns))
