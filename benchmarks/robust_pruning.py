"""Robust accuracy after pruning: HARP against HYDRA, magnitude/LAMP pruning, NNI and Torch-Pruning.

Threat model: L-inf, eps = 0.12 (30.6/255) on images in [0, 1] (digits: scikit-learn's 8x8
digits, bilinearly resized). Picked from the dense models alone, before any pruned model was
evaluated, as the radius whose PGD-AT dense models' PGD-20 accuracy lies closest to 65 %, the
middle of 50-80 %: at 0.12 the three seeds' dense models have clean 99.2 / 99.1 / 98.9 %, PGD-20
66.2 / 69.3 / 67.9 % (all 899 held-out images) and AutoAttack 66.5 / 66.5 / 64.0 % (the first
200); at 0.1 PGD-20 75.0 / 75.9 / 73.7 %, at 0.07 85.7 / 86.7 / 84.1 % (``--dense-only --eps E
--aa-samples 200``). Until 2026-12-02 the radius was 0.07 (dense PGD-20 62-69 %), picked the same
way with dense models trained on every epoch's last, partial batch, which cost them about 20 points
(``--keep-last-batch``, below). MNIST-style work uses 0.3, but these blurry 8x8, 16-level digits
allow far less.

Per seed, the digits are split anew (stratified; ``--test-fraction`` 0.5 holds out 899 of the
1,797 images for evaluation) and one dense model is adversarially trained from scratch (PGD-5
AT, Adam, eps ramped over the first 30 % of 60 epochs, best of every 5th checkpoint by PGD-10 on
256 training images: SGD at lr 0.05 collapsed on some seeds) and cached. Every method then prunes
a copy of it to each setting and fine-tunes the remaining weights with the same PGD-AT budget
(``--finetune-epochs``, SGD lr 0.01, cosine; masked fine-tuning, or fine-tuning of Torch-Pruning's
physically smaller model), keeping the best of the pruned model itself and the fine-tuning
checkpoints by PGD-10 on 256 training images, as the dense models' pretraining does. Every epoch
leaves out its last, partial batch (2 images), as the pipeline does (``nni_harp.data.drops_last_batch``):
trained on, its BatchNorm statistics at 1x1 spatial size made PGD-AT collapse at random epoch ends
(``benchmarks/finetune_stability.py``; runs before 2026-12-02, ``--keep-last-batch yes``). The pruned model's
clean and PGD-20 accuracy before fine-tuning is reported too, so a collapse can be placed in the
pruning or in the fine-tuning. HARP and HYDRA are used through the public API (``nni_harp.HARPPruner``
/ ``HydraPruner``, NNI ``TorchEvaluator``) with their *default* settings: they learn scores (HARP
also rates) for ``--prune-epochs`` (20, the original's schedule) with the weights frozen; one
short-schedule row prunes 90 % unstructured in ``--short-prune-epochs`` (3, the NNI-API case).
NNI's MovementPruner spends the same pruning epochs (it fine-prunes: weights and scores train).
Structured results are physically pruned by ``graph_passes.ModelSpeedup`` and measured on the
smaller model.

Reported per cell, mean ± standard deviation over seeds: clean accuracy, PGD-20 (step 2.5 eps /
20, random start), full AutoAttack (torchattacks 'standard': APGD-CE, APGD-T, FAB-T, Square with
5,000 queries) and the robust accuracy, the lower of PGD-20 and AutoAttack per model; kept
parameters and FLOPs; wall and CPU seconds. For HARP, per setting: min / max / spread of the
learned per-layer (per channel group) kept fractions, the kept fraction after the first epoch, the
first epoch that met the target and the epoch at which gamma froze (``pruner.history``,
``pruner.schedule.frozen_at``).

Methods (``_robust_methods.METHODS``): ``harp``, ``hydra``, ``global-mag``, ``layer-mag``,
``lamp`` (unstructured), ``harp-alloc-mag`` (the ablation: HARP's per-layer / per-group kept counts
filled with the highest-magnitude weights / channels, so the value of the learned rates shows on
its own), ``nni-movement`` (unstructured), ``nni-l1`` and ``nni-taylor`` (structured),
``torch-pruning`` (structured); ``harp-latency`` and ``harp-flops-matched`` (the latency setting only).

Latency setting (``--latency-target T``, off by default): the extra structured setting "latency xT"
of ``--model`` asks whether HARP's latency budget buys robustness over its FLOPs budget at the same
speed. The dense model's ``graph_passes.LatencyModel`` is fitted on ``--latency-backend``
(onnxruntime) with ``--latency-threads`` (1) at one image and cached under ``--cache-dir``/latency
(a target below what HARP's floors can reach per that model is refused before anything trains).
``harp-latency`` is HARP with default settings but ``budget='latency'`` keeping T of the predicted
dense latency; ``harp-flops-matched`` is HARP with its FLOPs budget at the FLOPs of the uniform plan
that same latency model predicts at T (``nni_harp.pruning.budget.uniform_keep``). Both fine-tune as
every method; then the physically pruned model and the dense model are timed alternately on that
backend (3 rounds of ``--latency-reps`` runs, each model's lowest median) and the table shows the
measured and the predicted latency fraction next to the accuracies, so one sees whether the two
landed at the same measured latency.

Models: the full grid (90 / 95 / 99 % unstructured, 50 / 75 / 90 % of FLOPs removed) on
``--model`` (``test_resnet`` at 16 px); ``--large-model`` (``resnet18`` at 32 px) at 99 %
unstructured and 75 % FLOPs removed.

Cost (CPU seconds on this project's machine, one thread): a test_resnet PGD-5 epoch ~4.5, PGD-20 on
the 899 held-out images ~10, AutoAttack ~0.1-0.2 per sample (evaluation, i.e. clean, PGD-20 on
all 899 and AutoAttack, per model in the results' ``eval_s``: 17 s median with AutoAttack on 100
samples in ``results/robust_pruning_structured.json``, 102 s on all 899 in
``results/robust_pruning_structured_aa_all.json``, whose dense models took 152-218 s; two
processes side by side); resnet18 at 32 px
is ~13x that (a PGD-5 epoch ~60, PGD-20 ~120). So the CPU default (``--device cpu``: 2 worker
processes) runs the test_resnet grid with 3 seeds and AutoAttack on the first ``CPU_AA_SAMPLES``
held-out images of each model, and leaves resnet18 out (``--large-model resnet18`` adds it, one
seed); ``--device cuda`` runs both models, every seed, AutoAttack on every held-out image. On 100
samples AutoAttack's sampling error (about 5 points) hides the differences between the leading
methods: the dense models' AutoAttack accuracy was 60.3 +- 5.0 % over the 3 seeds on 100 samples
and 60.8 +- 0.2 % on all 899, and at 75 % of the FLOPs removed HYDRA led HARP by 0.7 on 100
samples and trailed it by 0.2 on all 899 (same pruned models). ``--aa-samples all`` (85 s more per
test_resnet model, median over the same 72 pruned models; the structured grid in 82 instead of 24
minutes) is what the reported structured tables use.

Finished cells are cached under ``--cache-dir`` (one folder per fingerprint of the options that
change results and of the source of nni_harp, graph_passes and this benchmark), so re-running the
same command after an interruption continues where it stopped; ``--fresh`` recomputes. The dense
models are cached by what trains them only.

    python benchmarks/robust_pruning.py                            # the CPU default
    python benchmarks/robust_pruning.py --device cuda --jobs 4     # everything, all seeds, on a GPU
    python benchmarks/robust_pruning.py --dense-only --eps 0.1     # dense accuracies at one eps

Writes ``benchmarks/results/robust_pruning.md`` and ``.json`` (atomically, after every cell).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nni
import timm
import torch
from _common import RESULTS, n_flops, n_params, write_atomic
from _robust_methods import LATENCY, METHODS, Method, Pruned, allocation, prunable_layers, removes_channels
from _robust_options import _PARSERS, DEFAULT_CACHE_DIR, Cell, Grid, Options, cells, grids
from _robust_report import Row, render
from _robust_setup import LATENCY_ROUNDS, LatencyTargetError, Setup, check_latency_target, source_fingerprint
from torch import nn

import graph_passes as gp
from nni_harp.pruning import fix_masks, release_masks

log = logging.getLogger("robust_pruning")

# ------------------------------------------------------------------------------------- one cell
def _sparse_flops_kept(model: nn.Module, masks: dict[str, dict[str, torch.Tensor]], example: torch.Tensor) -> float:
    names = prunable_layers(model)
    by_module = gp.cost(model, (example,)).flops_by_module()
    flops = {n: by_module.get(n, 0) for n in names}
    total = sum(flops.values())
    return sum(flops[n] * float(masks[n]["weight"].float().mean()) if n in masks else flops[n] for n in names) / total


def finetune_and_evaluate(setup: Setup, dense: nn.Module, model: nn.Module, small: nn.Module | None,
                          masks: dict[str, dict[str, torch.Tensor]] | None, cell: Cell, row: Row, repeat: int) -> Row:
    """Fine-tune a copy of the pruned model (``small``, or ``model`` under ``masks``) as repeat
    ``repeat`` of ``--finetune-repeats``, then evaluate it into ``row``."""
    start = time.perf_counter()
    if small is not None:
        small = copy.deepcopy(small)
        setup.finetune(small, row, repeat)
    else:
        model = copy.deepcopy(model)
        fix_masks(model, masks)
        setup.finetune(model, row, repeat)
        release_masks(model)
        model.eval()
        if removes_channels(cell.mode):
            small = gp.ModelSpeedup(copy.deepcopy(model), setup.example, masks).speedup_model()
            with torch.no_grad():
                x = setup.test_batches[0][0][:16].to(setup.device)
                diff = float((small.eval()(x) - gp.masked_copy(model, masks).eval()(x)).abs().max())
            if diff > 1e-3:
                row.note = f"speedup differs from masked model by {diff:.2g}"
        else:
            row.kept_params = sum(int((p != 0).sum()) for p in model.parameters()) / n_params(dense)
            row.kept_flops = _sparse_flops_kept(model, masks, setup.example)
            small = model
    row.finetune_s = time.perf_counter() - start
    small.eval()
    if cell.mode == LATENCY:
        row.latency_measured, row.dense_ms, row.pruned_ms = setup.measure_latency(dense, small)
    if removes_channels(cell.mode):
        row.kept_params = n_params(small) / n_params(dense)
        row.kept_flops = n_flops(small, setup.example) / n_flops(dense, setup.example)
    return setup.evaluate(small, row)


def _mean_of(runs: list[Row]) -> Row:
    """One row for several fine-tunings of one pruned model: accuracies averaged (each repeat's in
    ``repeats``), times summed, the first repeat's kept epoch and note."""
    row = replace(runs[0], repeats=[{k: getattr(r, k) for k in ("clean", "pgd20", "autoattack", "robust", "ft_epoch")}
                                    for r in runs])
    for key in ("clean", "pgd20", "autoattack", "robust"):
        setattr(row, key, statistics.fmean(getattr(r, key) for r in runs))
    row.finetune_s, row.eval_s = sum(r.finetune_s for r in runs), sum(r.eval_s for r in runs)
    row.note = "; ".join(dict.fromkeys(r.note for r in runs if r.note))
    return row


def run_cell(setup: Setup, cache: Path, cell: Cell, prior: Row | None) -> Row:
    """Prune the dense model with one method, fine-tune it (PGD-AT) and evaluate it."""
    method: Method = METHODS[cell.method]
    row = Row(cell.grid.model, cell.grid.image_size, cell.seed, cell.mode, cell.target, cell.method, cell.prune_epochs)
    dense = setup.dense(cache)
    if cell.mode == LATENCY:
        setup.latency(cache)  # fitted before the pruner, which reads it from the cache
    model = copy.deepcopy(dense)
    torch.manual_seed(cell.seed)
    start = time.perf_counter()
    pruned: Pruned = method.prune(setup, model, cell.mode, cell.target, cell.prune_epochs,
                                  None if prior is None else prior.alloc)
    row.prune_s = time.perf_counter() - start
    row.rates, row.history, row.frozen_at = pruned.rates, pruned.history, pruned.frozen_at
    row.budget_target, row.budget_kind = pruned.budget_target, pruned.budget_kind
    masks = None
    if pruned.small is None:
        masks = {m: {p: t.to(setup.device) for p, t in d.items()} for m, d in (pruned.masks or {}).items()}
        if cell.method == "harp":
            row.alloc = allocation(masks, cell.mode, setup.structure)
        if cell.mode == LATENCY:
            row.latency_predicted = setup.latency_plan.predicted(masks)
    runs = [finetune_and_evaluate(setup, dense, model, pruned.small, masks, cell, replace(row), repeat)
            for repeat in range(setup.opts.finetune_repeats)]
    row = runs[0] if len(runs) == 1 else _mean_of(runs)
    log.info("%s: robust %.3f in %.0f s (prune %.0f, fine-tune %.0f, eval %.0f)", cell.key, row.robust, row.seconds,
             row.prune_s, row.finetune_s, row.eval_s)
    return row


# -------------------------------------------------------------------------------------- workers
_SETUPS: OrderedDict[tuple[Options, Grid, int], Setup] = OrderedDict()
_MAX_SETUPS = 6  # (model, seed) setups a process keeps: data, dense model, channel structure


def _setup(opts: Options, grid: Grid, seed: int) -> Setup:
    key = (opts, grid, seed)
    if key not in _SETUPS:
        _SETUPS[key] = Setup(opts, grid, seed)
        while len(_SETUPS) > _MAX_SETUPS:
            _SETUPS.popitem(last=False)
    _SETUPS.move_to_end(key)
    return _SETUPS[key]


def dense_job(opts: Options, cache: Path, grid: Grid, seed: int) -> Row:
    """Train (or load) the dense model of one seed and evaluate it."""
    setup = _setup(opts, grid, seed)
    row = Row(grid.model, grid.image_size, seed, "dense", None, "dense", kept_params=1.0, kept_flops=1.0)
    start = time.perf_counter()
    model = copy.deepcopy(setup.dense(cache))
    row.prune_s = time.perf_counter() - start  # pretraining (0 when cached)
    setup.evaluate(model, row)
    return row


def cell_job(opts: Options, cache: Path, cell: Cell, prior: Row | None) -> Row:
    return run_cell(_setup(opts, cell.grid, cell.seed), cache, cell, prior)


def _timed(fn: Callable[..., Row], *args: Any) -> Row:
    """Run a job and record its CPU time (wall time on a shared machine says little)."""
    start = time.process_time()
    row = fn(*args)
    row.cpu_s = time.process_time() - start
    return row


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    _quiet_logging()


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s %(message)s")
    for noisy in ("nni", "nni_harp", "graph_passes", "torch_pruning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Inline(cf.Executor):
    """Runs each job at submit time (``--jobs 1``: no worker processes)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future


# ---------------------------------------------------------------------------------------- runner
class Run:
    """Schedules the dense and cell jobs (dependencies first, cached ones skipped), collects their
    rows and rewrites the results after every finished job."""

    def __init__(self, opts: Options, cache_root: Path, out: Path, command: str, jobs: int, threads: int,
                 fresh: bool) -> None:
        opts = opts.resolved()
        self.opts, self.out, self.command, self.jobs, self.threads = opts, out, command, jobs, threads
        self.fingerprint = hashlib.sha256(json.dumps(
            {"opts": opts.result_fields(), "src": source_fingerprint()}, sort_keys=True, default=str).encode()
        ).hexdigest()[:12]
        self.cache = cache_root
        self.cells_dir = cache_root / "cells" / self.fingerprint
        self.fresh = fresh
        self.rows: dict[str, Row] = {}
        self.begin = time.perf_counter()
        self.sizes: dict[str, tuple[int, int]] = {}

    def _cached(self, key: str) -> Row | None:
        path = self.cells_dir / f"{key}.json"
        if self.fresh or not path.exists():
            return None
        return Row(**json.loads(path.read_text()))

    def _store(self, key: str, row: Row) -> None:
        self.rows[key] = row
        if row.ok:
            write_atomic(self.cells_dir / f"{key}.json", json.dumps(asdict(row), default=_json_default) + "\n")

    def execute(self, dense_only: bool) -> str:
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, tuple[Callable[..., Row], tuple[Any, ...], list[str]]] = {}
        for grid in grids(self.opts):
            for seed in grid.seeds:
                jobs[f"dense_{grid.tag}_s{seed}"] = (dense_job, (self.opts, self.cache, grid, seed), [])
        todo = [] if dense_only else cells(self.opts)
        keys = {c.key for c in todo}
        for cell in todo:
            dep = cell.needs()
            deps = [f"dense_{cell.grid.tag}_s{cell.seed}"] + ([] if dep is None else [dep.key])
            if dep is not None and dep.key not in keys:
                continue  # the ablation runs only with the method it reads
            jobs[cell.key] = (cell_job, (self.opts, self.cache, cell), deps)
        for key in jobs:
            cached = self._cached(key)
            if cached is not None:
                self.rows[key] = cached
        pool: cf.Executor = _Inline() if self.jobs == 1 else cf.ProcessPoolExecutor(
            self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(self.threads,))
        running: dict[cf.Future, str] = {}
        failed: set[str] = set()
        with pool:
            while True:
                for key, (fn, args, deps) in jobs.items():
                    if key in self.rows or key in running.values() or len(running) >= self.jobs:
                        continue
                    if any(d in failed for d in deps):
                        failed.add(key)
                        self._store(key, self._failed_row(key, args, "not run: a job it needs failed"))
                        continue
                    if all(d in self.rows for d in deps):
                        prior = [self.rows[d] for d in deps[1:]]
                        extra = (prior[0] if prior else None,) if fn is cell_job else ()
                        running[pool.submit(_timed, fn, *args, *extra)] = key
                if not running:
                    break
                done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                for future in done:
                    key = running.pop(future)
                    try:
                        row = future.result()
                    except Exception as exc:
                        log.error("%s failed: %s: %s", key, type(exc).__name__, exc, exc_info=exc)
                        failed.add(key)
                        row = self._failed_row(key, jobs[key][1], f"failed: {type(exc).__name__}: {str(exc)[:120]}")
                    self._store(key, row)
                    print(f"{key}: clean {_pct(row.clean)} PGD-20 {_pct(row.pgd20)} AA {_pct(row.autoattack)} "
                          f"({row.seconds:.0f} s) {row.note}", flush=True)
                    self.write(partial=True)
        return self.write(partial=False)

    @staticmethod
    def _failed_row(key: str, args: tuple[Any, ...], note: str) -> Row:
        target = args[2]
        if isinstance(target, Cell):
            return Row(target.grid.model, target.grid.image_size, target.seed, target.mode, target.target,
                       target.method, target.prune_epochs, note=note)
        grid, seed = args[2], args[3]
        return Row(grid.model, grid.image_size, seed, "dense", None, "dense", note=note)

    def header(self, partial: bool) -> list[str]:
        o = self.opts
        where = "every evaluation sample" if o.aa_samples is None else f"the first {o.aa_samples} evaluation samples"
        aa = ("AutoAttack (torchattacks 'standard': APGD-CE, APGD-T, FAB-T, Square 5,000 queries)"
              if o.autoattack == "standard" else f"**reduced** AutoAttack (torchattacks '{o.autoattack}', a smoke test)")
        split = (f"digits split anew per seed (stratified), {o.test_fraction:.0%} held out for evaluation"
                 if o.dataset == "digits" else f"`{o.dataset}`'s own train/test split")
        return [
            "# Robust pruning: HARP vs baselines",
            "",
            (f"Threat model: L-inf eps = {_eps_text(o.eps)} on images in [0, 1]. Data: {split}. Dense model per seed: "
            f"PGD-AT (PGD-{o.train_attack_steps}, step 2.5 eps / {o.train_attack_steps}) for {o.pretrain_epochs} epochs "
            f"(batch {o.batch_size}, lr {o.pretrain_lr}, cosine; "
            + ("every epoch also trains on its last, partial batch" if o.keep_last_batch
               else "every epoch leaves out its last, partial batch") + "). Every method fine-tunes adversarially for "
            f"{o.finetune_epochs} epochs after pruning (lr {o.finetune_lr}"
            + (f"; the best of the pruned model and the checkpoints of every {o.finetune_select_every} epoch(s) by "
               f"PGD-10 on 256 training images is kept: 'FT epoch kept', 0 = the pruned model" if o.finetune_select_every
               else "; the last checkpoint") + "). "
            + (f"Each pruned model is fine-tuned {o.finetune_repeats} times (its own attack randomness and batch "
               "order each) and evaluated after each; a cell's numbers are the means of those. " if
               o.finetune_repeats > 1 else "") +
            f"HARP and HYDRA (public API, default "
            f"settings) learn for {o.prune_epochs} pruning epochs with frozen weights; NNI MovementPruner fine-prunes "
            f"for the same number of epochs."),
            "",
            (f"Clean and PGD-20 (step 2.5 eps / 20, random start) on every evaluation sample; {aa} on {where}; "
            "**robust** = the "
            "lower of PGD-20 and AutoAttack, per model. Cells: mean ± sample standard deviation over seeds (the split "
            "and the dense model change with the seed), in %. Kept params: of the whole model (unstructured: "
            "non-zero). Kept FLOPs: structured, measured on the physically pruned model (graph_passes.ModelSpeedup "
            "/ Torch-Pruning); unstructured, the dense FLOPs of the Conv2d/Linear layers weighted by their density. "
            "Wall s / CPU s: per model (dense: pretraining and evaluation), mean over seeds; CPU s is the job "
            "process's CPU time, the cost on a machine shared with other work."),
            "",
            (f"Command: `{self.command}` ({o.device}, {self.jobs} process(es) x {self.threads} thread(s); "
            f"{(time.perf_counter() - self.begin) / 60:.1f} min in this invocation; cache fingerprint "
            f"`{self.fingerprint}`; torch {torch.__version__}, timm {timm.__version__}, nni {nni.__version__})."),
            *(["", (f"Latency setting (`--latency-target {o.latency_target:g}`, structured, {o.prune_epochs} pruning "
                   f"epochs): latency fitted and measured on {o.latency_backend} with {o.latency_threads} thread(s) at "
                   f"one {o.image_size} px image; measured fractions: the lower of {LATENCY_ROUNDS} alternating medians "
                   f"of {o.latency_reps} runs per model.")] if o.latency_target is not None else []),
            *(["", "**Partial results: the run had not finished when this was written.**"] if partial else []),
        ]

    def write(self, partial: bool) -> str:
        rows = list(self.rows.values())
        text = render(self.header(partial), rows, self.opts.prune_epochs)
        payload = {"options": asdict(self.opts), "fingerprint": self.fingerprint, "command": self.command,
                   "partial": partial, "rows": [asdict(r) for r in rows]}
        stem = self.out.parent / self.out.name  # "--out results/eps_0.07" keeps its dot
        write_atomic(stem.parent / f"{stem.name}.json", json.dumps(payload, indent=1, default=_json_default) + "\n")
        write_atomic(stem.parent / f"{stem.name}.md", text)
        return text


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _eps_text(eps: float) -> str:
    return f"{eps:g} ({eps * 255:.4g}/255)"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------------------------ CLI
def parse(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    """Options from the command line (one flag per Options field) plus how to run them."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Options):
        parse_text = f.metadata["parse"] or _PARSERS[str(f.type)]
        default = f.default if not isinstance(f.default, tuple) or not f.default or not isinstance(f.default[0], str) \
            else ",".join(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=parse_text, default=default,
                        help=f"{f.metadata['help']} (default: {default})")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores on cpu, 1 on a GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                    help="dense models and finished cells")
    ap.add_argument("--fresh", action="store_true", help="ignore cached cells (dense models are still reused)")
    ap.add_argument("--dense-only", action="store_true", help="train and evaluate the dense models only")
    ap.add_argument("--out", default=str(RESULTS / "robust_pruning"), help="output path without suffix")
    args = ap.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(Options)}
    try:
        opts = Options(**values).resolved()
    except ValueError as exc:
        ap.error(str(exc))
    if args.jobs is None:
        args.jobs = (os.cpu_count() or 1) if torch.device(opts.device).type == "cpu" else 1
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse(argv)
    torch.set_num_threads(args.threads)
    _quiet_logging()
    if not args.dense_only:
        for grid in grids(opts):
            if grid.latency is not None:
                try:  # before anything trains, as the pipeline refuses an unreachable --latency-target
                    check_latency_target(opts, grid, Path(args.cache_dir))
                except LatencyTargetError as exc:
                    print(f"robust_pruning.py: error: {exc}", file=sys.stderr)
                    return 2
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/robust_pruning.py", *given])
    run = Run(opts, Path(args.cache_dir), Path(args.out), command, max(1, args.jobs), args.threads, args.fresh)
    print(run.execute(dense_only=args.dense_only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
