"""Norm statistics of structured runs (#11): with ``norm_stats='kept'`` (the default) the fine-tuned
masked model normalises its pruned LayerNorms over the kept channels, so the pruned model holds plain
``nn.LayerNorm``s of the kept width and equals the fine-tuned masked model; ``'exact'`` keeps the
exact-statistics norms; a run resumed after fine-tuning gives the same pruned model; ``load_pruned``
rebuilds it; a run of an older nni-harp (exact statistics) resumes only with ``norm_stats='exact'``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import graph_passes as gp
from nni_harp import load_pruned
from nni_harp._io import safe_load
from nni_harp.loading import create_model, load_weights, read_meta
from nni_harp.pipeline import PipelineCallback, PipelineConfig, run
from nni_harp.pipeline.checkpoint import ResumeError, RunStore
from nni_harp.pipeline.config import resume_defaults


class Interrupted(RuntimeError):
    """Raised from a callback to stop the run, as a kill would."""


class StopAtSpeedup(PipelineCallback):
    def on_stage_start(self, stage: str, epochs: int, start_epoch: int, total: int | None) -> None:
        if stage == "speedup":
            raise Interrupted("stopped after fine-tuning")


def _config(out: Path, **changes) -> PipelineConfig:
    base = PipelineConfig(
        model="test_vit", mode="structured", flops_target=0.5, output_dir=str(out), pretrain_epochs=1,
        prune_epochs=1, finetune_epochs=1, batch_size=16, max_train_batches=2, attack_steps=1, eval_samples=4,
        eval_attack_steps=1, autoattack="off", latency_runs=1, export_onnx=False, seed=3,
    )
    return dataclasses.replace(base, **changes)


def _norms(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()
            if n.endswith(("norm1", "norm2", ".norm")) and not isinstance(m, nn.Identity)}


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kept") / "run"
    run(_config(out))
    return out


def test_a_kept_statistics_run_ends_with_plain_layer_norms_equal_to_the_fine_tuned_model(kept):
    report = json.loads((kept / "report.json").read_text())
    assert report["checks"]["speedup_max_abs_diff"] < 1e-4
    assert read_meta(kept)["norm_stats"] == "kept"
    pruned = load_pruned("test_vit", kept)
    assert read_meta(kept)["pruned_form"] == "module" and type(pruned.model).__name__ == "VisionTransformer"
    norms = _norms(pruned)
    assert norms and set(norms.values()) == {nn.LayerNorm}, norms
    width = pruned.get_submodule("model.blocks.0.norm1").normalized_shape[0]
    assert width < 64  # test_vit's embedding: its channels were pruned
    # the fine-tuned masked model, rebuilt from the checkpoints with the norms swapped, is what load_pruned gives
    meta = read_meta(kept)
    masked, _ = create_model("test_vit", meta["num_classes"], meta["in_chans"], meta["image_size"], meta["mean"],
                             meta["std"], meta["create_kwargs"])
    masks = safe_load(kept / "checkpoints" / "masks.pt")
    x = torch.rand(3, 3, 32, 32)
    assert gp.kept_stats_norms(masked, masks, x[:1])
    load_weights(masked, safe_load(kept / "checkpoints" / "finetuned.pt"))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked.eval()(x), atol=1e-5, rtol=1e-4)


def test_exact_statistics_keep_exact_norms(tmp_path, kept):
    out = tmp_path / "run"
    run(_config(out, norm_stats="exact", checkpoint=str(kept)))
    assert read_meta(out)["norm_stats"] == "exact"
    assert gp.ExactStatsNorm in set(_norms(load_pruned("test_vit", out)).values())


def test_without_fine_tuning_the_statistics_stay_exact(tmp_path):
    assert not _config(tmp_path, finetune_epochs=0).kept_norm_stats
    assert not _config(tmp_path, mode="unstructured").kept_norm_stats
    assert _config(tmp_path).kept_norm_stats


def test_a_run_resumed_after_fine_tuning_gives_the_same_pruned_model(tmp_path, kept):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(_config(out), callbacks=[StopAtSpeedup()])
    assert not (out / "model.pt").exists()
    run(_config(out, resume=True))
    got, want = safe_load(out / "model.pt"), safe_load(kept / "model.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert set(_norms(load_pruned("test_vit", out)).values()) == {nn.LayerNorm}


def test_an_older_run_resumes_with_exact_statistics_only(tmp_path):
    config = _config(tmp_path / "run").to_dict()
    store = RunStore(tmp_path / "run")
    store.start({k: v for k, v in config.items() if k != "norm_stats"}, False, False, PipelineConfig.RESUME_KEYS)
    with pytest.raises(ResumeError, match="norm_stats: 'exact' -> 'kept'"):
        RunStore(tmp_path / "run").start(config, True, False, PipelineConfig.RESUME_KEYS, resume_defaults())
    assert RunStore(tmp_path / "run").start({**config, "norm_stats": "exact"}, True, False, PipelineConfig.RESUME_KEYS,
                                            resume_defaults())
