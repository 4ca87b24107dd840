"""`nni-harp list-models --check`: which timm models the structured pruning path handles."""
from __future__ import annotations

import dataclasses

import graph_passes
from nni_harp.cli import main
from nni_harp.pipeline.support import check_model


def test_supported_model_is_ok():
    status = check_model("test_resnet")
    assert status.ok and 0 < status.prunable_groups <= status.groups and status.in_place
    assert status.describe() == f"ok ({status.prunable_groups}/{status.groups} channel groups prunable; pruned in place)"


def test_a_model_pruned_as_a_graph_says_so(monkeypatch):
    import graph_passes.model_speedup as speedup_module

    def refuse(work, gm, inputs, expected):  # what check_eager raises for a forward that keeps a size in Python
        raise graph_passes.SpeedupError("cannot prune ResNet in place: module 'fc' (Linear) fails")

    monkeypatch.setattr(speedup_module, "check_eager", refuse)
    status = check_model("test_resnet")
    assert status.ok and status.in_place is False
    assert status.describe().endswith("; pruned as a torch.fx.GraphModule)")


def test_failing_speedup_is_marked_with_its_reason(monkeypatch):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(graph_passes, "ModelSpeedup", Broken)
    status = check_model("test_resnet")
    assert not status.ok
    assert status.describe() == "unsupported: speedup: RuntimeError: boom"


def test_no_prunable_group_means_unstructured_only(monkeypatch):
    real = graph_passes.channel_groups

    def frozen(model, example=None):  # a module and its inputs, or a traced model alone
        return [dataclasses.replace(g, prunable=False, reason="test") for g in real(model, example)]

    monkeypatch.setattr(graph_passes, "channel_groups", frozen)
    status = check_model("test_resnet")
    assert not status.ok and status.reason is None
    assert status.describe() == "unstructured only (no prunable channel group)"


def test_list_models_check_streams_one_line_per_model(capsys, monkeypatch):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no")

    assert main(["list-models", "test_resne*", "--check"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("test_resnet\tok (")
    assert "1 models checked, 0 not supported" in out.err
    monkeypatch.setattr(graph_passes, "ModelSpeedup", Broken)
    assert main(["list-models", "test_resne*", "--check"]) == 0
    assert capsys.readouterr().out == "test_resnet\tunsupported: speedup: RuntimeError: no\n"
