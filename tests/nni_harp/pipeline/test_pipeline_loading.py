"""load_pruned rebuilds a pruned model from its timm name and an output folder."""
from __future__ import annotations

import json

import pytest
import torch

import graph_passes
from nni_harp import load_pruned
from nni_harp._io import atomic_save
from nni_harp.loading import LoadError, create_model, load_weights, read_meta, read_state, write_meta

MEAN, STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)


def _meta(plan):
    return {"model": "test_resnet", "num_classes": 10, "in_chans": 3, "image_size": 32, "mean": list(MEAN),
            "std": list(STD), "create_kwargs": None, "mode": "structured" if plan else "unstructured",
            "state_dict": "model.pt", "plan": plan}


def _model():
    torch.manual_seed(0)
    model, kwargs = create_model("test_resnet", 10, 3, 32, MEAN, STD)
    return model.eval(), kwargs


def test_create_model_passes_img_size_only_where_accepted():
    _, kwargs = create_model("test_resnet", 10, 3, 32, MEAN, STD)
    assert "img_size" not in kwargs and kwargs["num_classes"] == 10
    vit, kwargs = create_model("test_vit", 10, 3, 32, MEAN, STD)
    assert kwargs["img_size"] == 32
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_unstructured_round_trip(tmp_path):
    model, _ = _model()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_((torch.rand_like(p) > 0.8).float())
    atomic_save(model.state_dict(), tmp_path / "model.pt")
    write_meta(tmp_path, _meta(None))
    loaded = load_pruned("test_resnet", tmp_path)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training


def _structured(tmp_path):
    """test_resnet, a batch, masks removing every third channel of each prunable group, and their
    plan saved in ``tmp_path``."""
    model, _ = _model()
    x = torch.rand(4, 3, 32, 32)
    groups = graph_passes.channel_groups(model, (x[:1],))
    keep = {g.id: torch.arange(g.size) % 3 != 0 for g in groups if g.prunable}
    masks = graph_passes.group_masks(model, groups, keep)
    plan = graph_passes.PruningPlan.from_masks(model, (x[:1],), masks)
    plan.save(tmp_path / "plan.json")
    return model, x, masks, plan


def test_structured_round_trip_through_plan(tmp_path):
    model, x, masks, _ = _structured(tmp_path)
    small = graph_passes.ModelSpeedup(model, x[:1], masks).speedup_model(inplace=False).eval()
    atomic_save(small.state_dict(), tmp_path / "model.pt")
    write_meta(tmp_path, _meta("plan.json"))
    loaded = load_pruned("test_resnet", tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(loaded(x), small(x))
    assert isinstance(loaded, torch.fx.GraphModule)  # a folder without 'pruned_form' (older runs): the graph form


def test_structured_round_trip_in_place_gives_the_timm_model_back(tmp_path):
    model, x, masks, plan = _structured(tmp_path)
    small = graph_passes.ModelSpeedup(model, x[:1], masks).speedup_model().eval()  # `model` itself, pruned
    assert small is model
    atomic_save(small.state_dict(), tmp_path / "model.pt")
    write_meta(tmp_path, {**_meta("plan.json"), "pruned_form": "module"})
    loaded = load_pruned("test_resnet", tmp_path)
    assert type(loaded.model) is type(small.model) and not isinstance(loaded, torch.fx.GraphModule)
    assert [tuple(p.shape) for p in loaded.parameters()] == [tuple(p.shape) for p in small.parameters()]
    torch.testing.assert_close(loaded(x), small(x))
    # the plan's masks cover every member of each group: the same channels as the masks it was made from
    fresh, _ = _model()
    again = graph_passes.ModelSpeedup(fresh, x[:1], plan.masks(fresh, (x[:1],))).speedup_model()
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in small.parameters()]


def test_wrong_name_or_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LoadError, match="not an nni-harp output folder"):
        load_pruned("test_resnet", tmp_path)
    write_meta(tmp_path, _meta(None))
    with pytest.raises(LoadError, match="holds a pruned 'test_resnet', not 'resnet18'"):
        load_pruned("resnet18", tmp_path)


def test_load_weights_accepts_bare_timm_keys_and_rejects_others():
    model, _ = _model()
    other, _ = create_model("test_resnet", 10, 3, 32, MEAN, STD)
    load_weights(other, model.model.state_dict())  # keys without the wrapper's "model." prefix
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(other.eval()(x), model(x))
    with pytest.raises(LoadError, match="does not fit the model"):
        load_weights(other, {"model.nope": torch.zeros(1)})


def _unstructured_folder(tmp_path, **meta_changes):
    model, _ = _model()
    atomic_save(model.state_dict(), tmp_path / "model.pt")
    write_meta(tmp_path, {**_meta(None), **meta_changes})
    return model


@pytest.mark.parametrize(("change", "fragments"), [
    # before: passed straight to timm.create_model, which read the file (only timm's weights_only stopped a payload)
    ({"create_kwargs": {"pretrained": False, "num_classes": 10, "in_chans": 3, "checkpoint_path": "/tmp/evil.pt"}},
     ["field 'create_kwargs' holds 'checkpoint_path'", "refusing to pass it to timm.create_model"]),
    ({"create_kwargs": {"pretrained_cfg_overlay": {"file": "/tmp/evil.pt"}}}, ["holds 'pretrained_cfg_overlay'"]),
    ({"create_kwargs": {"pretrained": True}}, ["'pretrained' must be false"]),
    ({"create_kwargs": {"num_classes": 5}}, ["'num_classes' is 5, field 'num_classes' says 10"]),
    ({"state_dict": "../../elsewhere/model.pt"}, ["field 'state_dict' is '../../elsewhere/model.pt'"]),
    ({"plan": "/etc/plan.json"}, ["field 'plan' is '/etc/plan.json'"]),
    ({"extra": 1}, ["unknown field 'extra'"]),
    ({"num_classes": "10"}, ["field 'num_classes' must be int, got '10'"]),
    ({"mean": [0.3]}, ["field 'mean' must hold 3 numbers"]),
    ({"norm_stats": "fast"}, ["field 'norm_stats' is 'fast', expected one of kept, exact"]),
    ({"pruned_form": "pickle"}, ["field 'pruned_form' is 'pickle', expected one of module, graph"]),
], ids=["checkpoint_path", "cfg-overlay", "pretrained", "num-classes", "state-dict-path", "plan-path", "unknown",
        "type", "mean", "norm-stats", "pruned-form"])
def test_tampered_model_meta_is_refused_naming_the_file_and_field(tmp_path, change, fragments):
    _unstructured_folder(tmp_path, **change)
    with pytest.raises(LoadError) as info:
        load_pruned("test_resnet", tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "model_meta.json")), message
    for fragment in fragments:
        assert fragment in message


def test_the_meta_the_pipeline_writes_passes_its_own_check(tmp_path):
    _, kwargs = create_model("test_vit", 10, 3, 32, MEAN, STD)
    model = _unstructured_folder(tmp_path, create_kwargs=kwargs)  # test_resnet weights, test_vit's kwargs: refused
    assert read_meta(tmp_path)["create_kwargs"]["img_size"] == 32
    _, kwargs = create_model("test_resnet", 10, 3, 32, MEAN, STD)
    write_meta(tmp_path, {**_meta(None), "create_kwargs": kwargs, "dataset": "digits", "pruner": "harp"})
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(load_pruned("test_resnet", tmp_path)(x), model(x))


def test_state_dict_of_other_things_is_refused_with_the_entry_named(tmp_path):
    torch.save({"model.weight": torch.ones(1), "note": "hello"}, tmp_path / "odd.pt")
    with pytest.raises(LoadError, match=r"odd.pt does not hold a state dict: its entry 'note' is a str"):
        read_state(tmp_path / "odd.pt")


def test_evaluate_on_a_tampered_plan_names_plan_json_and_exits_2(tmp_path, capsys):
    import json

    from nni_harp.cli import main

    model, _ = _model()
    x = torch.rand(1, 3, 32, 32)
    groups = graph_passes.channel_groups(model, (x,))
    keep = {g.id: torch.arange(g.size) % 3 != 0 for g in groups if g.prunable}
    masks = graph_passes.group_masks(model, groups, keep)
    small = graph_passes.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    plan = graph_passes.PruningPlan.from_masks(model, (x,), masks).save(tmp_path / "plan.json")
    atomic_save(small.state_dict(), tmp_path / "model.pt")
    write_meta(tmp_path, _meta("plan.json"))
    data = json.loads(plan.read_text())
    data["kept"]["-2"] = [0]  # a Python index: once silently skipped, then blamed on model.pt
    plan.write_text(json.dumps(data))
    code = main(["evaluate", "test_resnet", "--checkpoint", str(tmp_path), "--eval-samples", "8",
                 "--eval-attack-steps", "1", "--autoattack", "off", "--latency-runs", "1", "--no-onnx", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{plan}" in err and "field 'kept' names group '-2', which does not exist" in err


def test_a_model_whose_forward_cannot_be_pruned_in_place_is_saved_and_loaded_as_the_pruned_graph(tmp_path, monkeypatch):
    import graph_passes.model_speedup as speedup_module
    from nni_harp.pipeline import PipelineConfig, run

    def refuse(work, gm, inputs, expected):  # what check_eager raises for a forward that keeps a size in Python
        raise graph_passes.SpeedupError("cannot prune ResNet in place: module 'fc' (Linear) fails")

    monkeypatch.setattr(speedup_module, "check_eager", refuse)
    out = tmp_path / "run"
    run(PipelineConfig(model="test_resnet", mode="structured", flops_target=0.5, output_dir=str(out), pretrain_epochs=1,
                       prune_epochs=1, finetune_epochs=1, batch_size=16, max_train_batches=2, attack_steps=1,
                       eval_samples=4, eval_attack_steps=1, autoattack="off", latency_runs=1, export_onnx=False, seed=0))
    assert read_meta(out)["pruned_form"] == "graph"
    monkeypatch.undo()
    loaded = load_pruned("test_resnet", out)
    assert isinstance(loaded, torch.fx.GraphModule)
    report = json.loads((out / "report.json").read_text())
    assert sum(p.numel() for p in loaded.parameters()) == report["pruned"]["params"] < report["dense"]["params"]
