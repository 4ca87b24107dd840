"""Coverage of graph_passes over timm: one smallest model per architecture family, pruned 30 % by
graph_passes and by Torch-Pruning (MetaPruner + MagnitudeImportance, classifier ignored).

Families are timm's model modules (``timm/models/<family>.py``), read from each entrypoint's
``__module__``; ``test_*`` models are left out. The smallest model of a family: the names are
ranked by their size words and numbers (atto < ... < tiny < small < base, b0 < b1, 050 < 100),
the first few are built on the meta device (no memory, no init cost) and the one with the fewest
parameters wins; the choice is cached in ``results/.coverage_smallest.json``.

Each family runs in a forked subprocess with a timeout, so a hang or a crash is recorded and the
run goes on. ``results/coverage.md`` is rewritten atomically after every family. Models whose
default input side exceeds 256 px run at 224 px where they accept it (see ``_model_and_input``).

    python benchmarks/coverage.py [--limit N] [--families resnet,vit...] [--timeout-per-model S] [--resume]
"""
from __future__ import annotations

import argparse
import collections
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


def _child(fn_name: str, name: str, conn) -> None:
    torch.set_num_threads(1)
    import warnings
    import logging

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    fn = {"ours": _ours, "tp": _tp}[fn_name]
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


def render(rows: dict[str, dict[str, Any]], total_families: int, timeout: float) -> tuple[str, str]:
    n = len(rows)
    st = collections.Counter(ours_status(r["ours"]) for r in rows.values())
    tp_ok = sum(bool(r["tp"].get("ok")) for r in rows.values())
    tp_ok_ours_fail = sorted(f for f, r in rows.items() if r["tp"].get("ok") and ours_status(r["ours"]) == "FAIL")
    traced = sum(bool(r["ours"].get("traced")) for r in rows.values())
    totals = (f"families run: {n}/{total_families}; graph_passes pass end to end: {st['pass']}/{n} "
              f"({100 * st['pass'] / max(n, 1):.1f} %), traced: {traced}/{n}, no prunable group: "
              f"{st['no prunable group']}, fail: {st['FAIL']}; Torch-Pruning ok: {tp_ok}/{n}; "
              f"Torch-Pruning ok but graph_passes fails: {len(tp_ok_ours_fail)} {tp_ok_ours_fail or ''}")
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
        f"masked reference). Params/FLOPs kept: pruned / dense (FLOPs by FlopCounterMode). One CPU thread per "
        f"model, timeout {timeout:.0f} s per model and tool in the latest run (with --resume, rows of families that "
        f"passed in an earlier run are kept from it).",
        "",
        f"**Totals:** {totals}",
        "",
        "| family | model | input | status | traced | groups | prunable | runs | match | params kept | FLOPs kept | s "
        "| TP ok | TP params kept | TP FLOPs kept | TP s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, r in sorted(rows.items()):
        o, t = r["ours"], r["tp"]
        err = "; ".join(x for x in (o.get("error") and f"ours: {o['error']}", t.get("error") and f"TP: {t['error']}") if x)
        err = err.replace("|", "\\|").replace("\n", " ")[:400]
        lines.append(
            f"| {fam} | {r['model']} | {_input_text(r)} | {ours_status(o)} | {_fmt(o.get('traced', False))} | {_fmt(o.get('groups'))} "
            f"| {_fmt(o.get('prunable'))} | {_fmt(o.get('runs'))} | {_fmt(o.get('match'))} "
            f"| {_fmt(o.get('params_kept'), True)} | {_fmt(o.get('flops_kept'), True)} | {_fmt(o.get('seconds'))} "
            f"| {_fmt(bool(t.get('ok')))} | {_fmt(t.get('params_kept'), True)} | {_fmt(t.get('flops_kept'), True)} "
            f"| {_fmt(t.get('seconds'))} | {err} |")
    return "\n".join(lines) + "\n", totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="run at most this many families")
    ap.add_argument("--families", default=None, help="comma-separated family names (timm module names)")
    ap.add_argument("--timeout-per-model", type=float, default=300.0, help="seconds per model and tool")
    ap.add_argument("--output", type=Path, default=RESULTS / "coverage.md")
    ap.add_argument("--resume", action="store_true", help="reuse the JSON sidecar's results, rerunning the (selected) "
                    "families graph_passes failed; the report keeps every family's row")
    args = ap.parse_args(argv)

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
    # with --resume the report covers every family: the selected ones are (re)run, the others kept
    reported = smallest(all_fams) if args.resume else chosen

    sidecar = args.output.with_suffix(".json")
    rows: dict[str, dict[str, Any]] = {}
    if args.resume and sidecar.exists():
        rows = {f: r for f, r in json.loads(sidecar.read_text()).items() if f in reported and r["model"] == reported[f]}
    for i, (fam, name) in enumerate(chosen.items()):
        if fam in rows and ours_status(rows[fam]["ours"]) != "FAIL":
            continue
        ours = run_isolated("ours", name, args.timeout_per_model)
        tpr = run_isolated("tp", name, args.timeout_per_model)
        rows[fam] = {"model": name, "ours": ours, "tp": tpr}
        print(f"[{i + 1}/{len(chosen)}] {fam:28s} {name:40s} ours={ours_status(ours):18s} tp={bool(tpr.get('ok'))} "
              f"{ours.get('error', '')[:150]}", flush=True)
        text, _ = render(rows, len(reported), args.timeout_per_model)
        write_atomic(sidecar, json.dumps(rows, indent=1, sort_keys=True, default=str))
        write_atomic(args.output, text)
    text, totals = render(rows, len(reported), args.timeout_per_model)
    write_atomic(args.output, text)
    print(totals)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
