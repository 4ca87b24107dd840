"""Coverage of graph_passes over timm: one smallest model per architecture family, pruned 30 % by
graph_passes and by Torch-Pruning (MetaPruner + MagnitudeImportance, classifier ignored), and
pruned as an NNI user would (column ``nni``): ``graph_passes.auto_set_dependency_group_ids`` on
NNI's usual config list, ``L1NormPruner`` at 50 %, then ``graph_passes.ModelSpeedup`` in place (or,
where it refuses with its clear error, ``speedup_model(inplace=False)``).

Families are timm's model modules (``timm/models/<family>.py``), read from each entrypoint's
``__module__``; ``test_*`` models are left out. The smallest model of a family: the names are
ranked by their size words and numbers (atto < ... < tiny < small < base, b0 < b1, 050 < 100),
the first few are built on the meta device (no memory, no init cost) and the one with the fewest
parameters wins; the choice is cached in ``results/.coverage_smallest.json``.

Each family runs in a forked subprocess with a timeout, so a hang or a crash is recorded and the
run goes on. ``results/coverage.md`` is rewritten atomically after every family. Models whose
default input side exceeds 256 px run at 224 px where they accept it (see ``_model_and_input``).

    python benchmarks/coverage.py [--limit N] [--families resnet,vit...] [--timeout-per-model S] [--resume]
                                  [--tools ours,tp,nni]

``--tools`` runs only those columns and keeps the others' results from the JSON sidecar.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import multiprocessing as mp
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.models._registry import model_entrypoint  # noqa: E402

from _common import RESULTS, apply_masks, calibrate_norms, n_flops, n_params, write_atomic  # noqa: E402

RATIO = 0.3
NNI_RATIO = 0.5
TOOLS = ("ours", "tp", "nni")
SEED = 0
ATOL = 1e-4
RTOL = 1e-4
BATCH = 2
CANDIDATES = 4
MAX_SIDE = 256  # larger default inputs are rebuilt at REDUCED_SIDE where the model takes img_size
REDUCED_SIDE = 224
SIZE_WORDS = {w: i for i, w in enumerate(
    "atto femto pico nano xxxs xxs xs mini tiny t s0 small s lite m0 m b0 medium base b large l xlarge huge giant".split())}


def _size_rank(name: str) -> tuple:
    tokens = re.split(r"[_.\-]", name.lower())
    word = min((SIZE_WORDS[t] for t in tokens if t in SIZE_WORDS), default=len(SIZE_WORDS) // 2)
    nums = [int(n) for n in re.findall(r"\d+", name)]
    return (word, sum(nums), len(name))


def families() -> dict[str, list[str]]:
    fam: dict[str, list[str]] = collections.defaultdict(list)
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        fam[model_entrypoint(name).__module__.split(".")[-1]].append(name)
    return dict(sorted(fam.items()))


def _meta_params(name: str) -> float:
    try:
        with torch.device("meta"):
            return float(n_params(timm.create_model(name)))
    except Exception:  # noqa: BLE001 - a model that cannot build on meta just ranks last
        return float("inf")


def smallest(fams: dict[str, list[str]]) -> dict[str, str]:
    cache_path = RESULTS / ".coverage_smallest.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    changed = False
    for fam, names in fams.items():
        if fam in cache and cache[fam] in names:
            continue
        cands = sorted(names, key=_size_rank)[:CANDIDATES]
        cache[fam] = min(cands, key=lambda n: (_meta_params(n), _size_rank(n)))
        changed = True
    if changed:
        write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True))
    return {f: cache[f] for f in fams}


def _model_and_input(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (random weights, calibrated norms) and its input. Models whose default input side
    exceeds MAX_SIDE run at REDUCED_SIDE: built with ``img_size=REDUCED_SIDE`` when their
    constructor takes it (ViT-style models sized 384 to 896 pixels), otherwise fed the smaller
    input directly when the model accepts it (CNNs at 299/331, Hiera-Det at 896)."""
    torch.manual_seed(SEED)
    model = timm.create_model(name, pretrained=False).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    if max(h, w) > MAX_SIDE:
        try:
            torch.manual_seed(SEED)
            model = timm.create_model(name, pretrained=False, img_size=REDUCED_SIDE).eval()
            h = w = REDUCED_SIDE
        except TypeError:
            try:
                with torch.no_grad():
                    model(torch.randn(1, c, REDUCED_SIDE, REDUCED_SIDE))
                h = w = REDUCED_SIDE
            except Exception:  # noqa: BLE001 - a model fixed to its size keeps it
                pass
    x = torch.randn(BATCH, c, h, w)
    return calibrate_norms(model, x), x


def _ours(name: str, send) -> None:
    import graph_passes as gp

    rec: dict[str, Any] = {}
    t0 = time.perf_counter()
    model, x = _model_and_input(name)
    rec["input"] = list(x.shape[1:])
    gm = gp.trace(model, x)
    rec["traced"] = True
    send(rec)
    groups = gp.channel_groups(gm, x)
    rec["groups"] = len(groups)
    rec["prunable"] = sum(g.prunable for g in groups)
    send(rec)
    if rec["prunable"]:
        masks = gp.group_masks(model, groups, gp.random_keep(groups, RATIO, SEED))
        pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False).eval()
        with torch.no_grad():
            out = pruned(x)
            rec["runs"] = True
            send(rec)
            ref = apply_masks(model, masks)(x)
        rec["max_err"] = float((out - ref).abs().max()) if out.shape == ref.shape else float("inf")
        rec["match"] = bool(out.shape == ref.shape and torch.allclose(out, ref, atol=ATOL, rtol=RTOL))
        rec["params_kept"] = n_params(pruned) / n_params(model)
        rec["flops_kept"] = n_flops(pruned, x) / n_flops(model, x)
    rec["seconds"] = time.perf_counter() - t0
    send(rec)


def _tp(name: str, send) -> None:
    import torch_pruning as tp

    rec: dict[str, Any] = {}
    t0 = time.perf_counter()
    model, x = _model_and_input(name)
    with torch.no_grad():
        ref_shape = model(x).shape
    params0, flops0 = n_params(model), n_flops(model, x)
    ignored = [m for m in [model.get_classifier()] if isinstance(m, torch.nn.Module) and any(True for _ in m.parameters())]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=RATIO, ignored_layers=ignored)
    pruner.step()
    with torch.no_grad():
        out = model(x)
    rec["runs"] = out.shape == ref_shape
    rec["params_kept"] = n_params(model) / params0
    rec["flops_kept"] = n_flops(model, x) / flops0
    rec["ok"] = bool(rec["runs"] and rec["params_kept"] < 1.0)
    rec["seconds"] = time.perf_counter() - t0
    send(rec)


def _nni(name: str, send) -> None:
    """NNI's flow: dependency groups, L1NormPruner's masks, ModelSpeedup in place; the GraphModule
    where the in-place speedup refuses (its error must say to use ``inplace=False``)."""
    import graph_passes as gp
    from nni.compression.base.setting import PruningSetting
    from nni.compression.pruning import L1NormPruner

    rec: dict[str, Any] = {}
    t0 = time.perf_counter()
    model, x = _model_and_input(name)
    # every Conv2d and Linear, timm's subclasses (StdConv2d, Conv2dSame, ...) registered with NNI's default setting
    types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))})
    for t in types:
        if t not in PruningSetting.registry:
            PruningSetting.register(t, copy.deepcopy(PruningSetting.default_setting))
    config = gp.auto_set_dependency_group_ids(model, x, [{"op_types": types, "sparse_ratio": NNI_RATIO}])
    rec["layers"] = len(config)
    send(rec)
    if config:
        pruner = L1NormPruner(model, config)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        dense = copy.deepcopy(model)
        speedup = gp.ModelSpeedup(model, x, masks)
        try:
            pruned = speedup.speedup_model()
            rec["inplace"] = True
        except gp.SpeedupError as exc:
            if "speedup_model(inplace=False)" not in str(exc):
                raise
            rec["inplace"], rec["inplace_error"] = False, str(exc).split(". Its Python code")[0][:300]
            send(rec)
            pruned = speedup.speedup_model(inplace=False)
        pruned.eval()
        with torch.no_grad():
            out, ref = pruned(x), apply_masks(dense, speedup.applied_masks)(x)
        rec["runs"] = True
        rec["match"] = bool(out.shape == ref.shape and torch.allclose(out, ref, atol=ATOL, rtol=RTOL))
        rec["params_kept"] = n_params(pruned) / n_params(dense)
        rec["flops_kept"] = n_flops(pruned, x) / n_flops(dense, x)
    rec["seconds"] = time.perf_counter() - t0
    send(rec)


def nni_status(r: dict[str, Any]) -> str:
    if "error" in r or (r.get("layers") and not r.get("match")):
        return "FAIL"
    if not r.get("layers") or r.get("flops_kept", 1.0) >= 1.0:
        return "no FLOPs drop"
    return "in place" if r.get("inplace") else "GraphModule"


def _child(fn_name: str, name: str, conn) -> None:
    torch.set_num_threads(1)
    import warnings
    import logging

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    fn = {"ours": _ours, "tp": _tp, "nni": _nni}[fn_name]
    try:
        fn(name, conn.send)
    except BaseException as exc:  # noqa: BLE001 - recorded, the parent carries on
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "graph_passes" in f.filename), "")
        conn.send({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} {where}".strip()})
    conn.close()


def run_isolated(fn_name: str, name: str, timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn_name, name, send), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    rec: dict[str, Any] = {}
    deadline = t0 + timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            rec["error"] = f"timeout after {timeout:.0f}s"
            proc.kill()
            break
        if recv.poll(min(left, 1.0)):
            try:
                msg = recv.recv()
            except EOFError:
                break
            err = msg.pop("error", None)
            rec.update(msg)
            if err:
                rec["error"] = err
        elif not proc.is_alive() and not recv.poll(0):
            if proc.exitcode not in (0, None) and "error" not in rec:
                rec["error"] = f"process exited with code {proc.exitcode}"
            break
    proc.join(5)
    rec.setdefault("seconds", time.perf_counter() - t0)
    return rec


def ours_status(r: dict[str, Any]) -> str:
    if r.get("match") and r.get("params_kept", 1.0) < 1.0:
        return "pass"
    if r.get("prunable") == 0 and "error" not in r:
        return "no prunable group"
    return "FAIL"


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if pct:
        return f"{100 * v:.0f} %"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _input_text(row: dict[str, Any]) -> str:
    size = row["ours"].get("input")
    if size is None:  # rows from runs before the size was recorded ran at the default size
        size = timm.models.get_pretrained_cfg(row["model"]).input_size[1:]
    return "x".join(str(s) for s in size[-2:])


def _status(tool: str, r: dict[str, Any]) -> str:
    return {"ours": ours_status, "nni": nni_status, "tp": lambda t: "ok" if t.get("ok") else "FAIL"}[tool](r)


def render(rows: dict[str, dict[str, Any]], total_families: int, timeout: float) -> tuple[str, str]:
    n = len(rows)
    st = collections.Counter(ours_status(r["ours"]) for r in rows.values())
    ns = collections.Counter(nni_status(r["nni"]) for r in rows.values() if "nni" in r)
    tp_ok = sum(bool(r["tp"].get("ok")) for r in rows.values())
    tp_ok_ours_fail = sorted(f for f, r in rows.items() if r["tp"].get("ok") and ours_status(r["ours"]) == "FAIL")
    traced = sum(bool(r["ours"].get("traced")) for r in rows.values())
    totals = (f"families run: {n}/{total_families}; graph_passes pass end to end: {st['pass']}/{n} "
              f"({100 * st['pass'] / max(n, 1):.1f} %), traced: {traced}/{n}, no prunable group: "
              f"{st['no prunable group']}, fail: {st['FAIL']}; Torch-Pruning ok: {tp_ok}/{n}; "
              f"Torch-Pruning ok but graph_passes fails: {len(tp_ok_ours_fail)} {tp_ok_ours_fail or ''}; "
              f"NNI flow (L1NormPruner {100 * NNI_RATIO:.0f} % with dependency groups, ModelSpeedup) pruned equal to "
              f"masked with fewer FLOPs: {ns['in place'] + ns['GraphModule']}/{sum(ns.values())} ({ns['in place']} in place, "
              f"{ns['GraphModule']} as GraphModule after the clear in-place error), no FLOPs drop: {ns['no FLOPs drop']}, "
              f"fail: {ns['FAIL']}")
    lines = [
        "# graph_passes coverage over timm families",
        "",
        f"One smallest model per timm family (random weights, BatchNorm statistics from one pass on the input, batch {BATCH}); "
        f"input: the model's default input size, except that models whose default side exceeds {MAX_SIDE} px are "
        f"built at img_size={REDUCED_SIDE} where their constructor accepts it, else fed a {REDUCED_SIDE} px input where they accept one (column 'input'). "
        f"30 % of the channels of every prunable group removed at random (seed {SEED}). "
        f"'match': pruned outputs allclose to the masked model (atol {ATOL}, rtol {RTOL}). "
        f"Torch-Pruning: MetaPruner + MagnitudeImportance(p=2), pruning_ratio {RATIO}, classifier ignored; "
        f"'ok' = the pruned model runs with the same output shape and fewer parameters (Torch-Pruning has no "
        f"masked reference). NNI: graph_passes.auto_set_dependency_group_ids on the config list "
        f"[{{'op_types': [every Conv2d and Linear type], 'sparse_ratio': {NNI_RATIO}}}] (timm's subclasses registered "
        f"with NNI's default setting), L1NormPruner's masks, "
        f"graph_passes.ModelSpeedup in place ('in place'), or speedup_model(inplace=False) where the in-place speedup "
        f"refuses with its error naming the module ('GraphModule'); pruned outputs allclose to the model masked with "
        f"ModelSpeedup.applied_masks, and fewer FLOPs. Params/FLOPs kept: pruned / dense (FLOPs by FlopCounterMode). One CPU thread per "
        f"model, timeout {timeout:.0f} s per model and tool in the latest run (with --resume, rows of families that "
        f"passed in an earlier run are kept from it).",
        "",
        f"**Totals:** {totals}",
        "",
        "| family | model | input | status | traced | groups | prunable | runs | match | params kept | FLOPs kept | s "
        "| TP ok | TP params kept | TP FLOPs kept | TP s | NNI | NNI FLOPs kept | NNI s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, r in sorted(rows.items()):
        o, t, nn_ = r["ours"], r["tp"], r.get("nni", {})
        notes = (o.get("error") and f"ours: {o['error']}", t.get("error") and f"TP: {t['error']}",
                 nn_.get("error") and f"NNI: {nn_['error']}", nn_.get("inplace_error") and f"NNI in place: {nn_['inplace_error']}")
        err = "; ".join(x for x in notes if x)
        err = err.replace("|", "\\|").replace("\n", " ")[:600]
        lines.append(
            f"| {fam} | {r['model']} | {_input_text(r)} | {ours_status(o)} | {_fmt(o.get('traced', False))} | {_fmt(o.get('groups'))} "
            f"| {_fmt(o.get('prunable'))} | {_fmt(o.get('runs'))} | {_fmt(o.get('match'))} "
            f"| {_fmt(o.get('params_kept'), True)} | {_fmt(o.get('flops_kept'), True)} | {_fmt(o.get('seconds'))} "
            f"| {_fmt(bool(t.get('ok')))} | {_fmt(t.get('params_kept'), True)} | {_fmt(t.get('flops_kept'), True)} "
            f"| {_fmt(t.get('seconds'))} | {nni_status(nn_) if nn_ else '-'} | {_fmt(nn_.get('flops_kept'), True)} "
            f"| {_fmt(nn_.get('seconds'))} | {err} |")
    return "\n".join(lines) + "\n", totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="run at most this many families")
    ap.add_argument("--families", default=None, help="comma-separated family names (timm module names)")
    ap.add_argument("--timeout-per-model", type=float, default=300.0, help="seconds per model and tool")
    ap.add_argument("--output", type=Path, default=RESULTS / "coverage.md")
    ap.add_argument("--resume", action="store_true", help="reuse the JSON sidecar's results, rerunning the (selected) "
                    "families where a selected tool failed; the report keeps every family's row")
    ap.add_argument("--tools", default=",".join(TOOLS), help="the columns to run (ours, tp, nni); the others keep "
                    "their results from the JSON sidecar")
    args = ap.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or set(tools) - set(TOOLS):
        ap.error(f"--tools: choose from {', '.join(TOOLS)}, got {args.tools!r}")

    all_fams = families()
    fams = all_fams
    if args.families:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in fams]
        if unknown:
            ap.error(f"unknown families {unknown}; known: {', '.join(fams)}")
        fams = {f: fams[f] for f in wanted}
    if args.limit is not None:
        fams = dict(list(fams.items())[: args.limit])
    chosen = smallest(fams)
    # with --resume or --tools the report covers every family: the selected ones are (re)run, the others kept
    keep_others = args.resume or set(tools) != set(TOOLS)
    reported = smallest(all_fams) if keep_others else chosen

    sidecar = args.output.with_suffix(".json")
    rows: dict[str, dict[str, Any]] = {}
    if keep_others and sidecar.exists():
        rows = {f: r for f, r in json.loads(sidecar.read_text()).items() if f in reported and r["model"] == reported[f]}
    for i, (fam, name) in enumerate(chosen.items()):
        row = rows.setdefault(fam, {"model": name})
        todo = [t for t in tools if not (args.resume and t in row and _status(t, row[t]) != "FAIL")]
        if not todo:
            continue
        for tool in todo:
            row[tool] = run_isolated(tool, name, args.timeout_per_model)
        for tool in TOOLS:
            row.setdefault(tool, {"error": "not run"})
        print(f"[{i + 1}/{len(chosen)}] {fam:28s} {name:40s} " + " ".join(f"{t}={_status(t, row[t])}" for t in todo)
              + f" {' '.join(row[t].get('error', '')[:120] for t in todo)}", flush=True)
        text, _ = render(rows, len(reported), args.timeout_per_model)
        write_atomic(sidecar, json.dumps(rows, indent=1, sort_keys=True, default=str))
        write_atomic(args.output, text)
    text, totals = render(rows, len(reported), args.timeout_per_model)
    write_atomic(args.output, text)
    print(totals)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
