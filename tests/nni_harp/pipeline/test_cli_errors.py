"""User errors of the command line: one clear line on stderr, a non-zero exit, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nni_harp.cli import build_parser, main


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nni_harp", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["prune", "resnet1x"], ["unknown timm model 'resnet1x'", "did you mean", "resnet18"]),
        (["prune", "test_resnet", "--sparsity", "1.5"], ["sparsity", "(0, 1)", "1.5"]),
        (["prune", "test_resnet", "--dataset", "imagefolder", "--data-dir", "/no/such/dir"],
         ["data_dir", "does not exist", "/no/such/dir"]),
        (["prune", "test_resnet", "--dataset", "imagefolder"], ["--data-dir is required"]),
        (["evaluate", "test_resnet", "--checkpoint", "/no/such/file.pt"], ["checkpoint", "does not exist"]),
    ],
)
def test_user_errors_exit_non_zero_with_a_clear_message(tmp_path, capsys, args, fragments):
    extra = ["--output-dir", str(tmp_path / "out")] if args[0] == "prune" else []
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nni-harp: error: ") and err.count("\n") == 1
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "out").exists()


def test_console_entry_point_prints_no_traceback(tmp_path):
    proc = _run("prune", "resnet1x", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("nni-harp: error: model: unknown timm model 'resnet1x'")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_in_process_main_returns_exit_code(capsys):
    assert main(["prune", "test_resnet", "--flops-target", "0", "--mode", "structured"]) == 2
    assert "flops_target: must be in (0, 1), got 0" in capsys.readouterr().err


def test_parser_reads_fractions_and_defaults():
    args = build_parser().parse_args(["prune", "test_resnet", "--eps", "4/255", "--mode", "structured"])
    assert args.eps == pytest.approx(4 / 255)
    assert (args.dataset, args.image_size, args.adv_loss, args.attack_steps) == ("digits", 32, "pgd", 3)
    assert args.checkpoint is None and args.resume is False and args.quiet is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "test_resnet", "--eps", "x/255"])


def test_help_documents_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--help"])
    assert info.value.code == 0
    stdout = capsys.readouterr().out
    for option in ("--dataset", "--image-size", "--mode", "--sparsity", "--flops-target", "--adv-loss",
                   "--eps", "--attack-steps", "--pretrain-epochs", "--prune-epochs", "--finetune-epochs",
                   "--batch-size", "--seed", "--output-dir", "--checkpoint", "--resume", "--quiet",
                   "--eval-samples", "--autoattack"):
        assert option in stdout
    assert "PGD-AT with 3 steps" in stdout and "first 200 test images" in stdout
    assert "--max-train-batches" not in stdout


def test_list_models_without_check_lists_names(capsys):
    assert main(["list-models", "test_res*"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == ["test_resnet"]
    assert "--check" in out.err
    assert main(["list-models", "no_such_model_*"]) == 2


def test_unusable_checkpoints_are_user_errors(tmp_path, capsys):
    import timm
    import torch

    wrong = tmp_path / "five_classes.pt"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path, fragment in ((wrong, "does not fit the model"), (garbage, "cannot read")):
        assert main(["evaluate", "test_resnet", "--checkpoint", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nni-harp: error: ") and fragment in err and str(path) in err
    assert main(["prune", "test_resnet", "--checkpoint", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "not an nni-harp run folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the inputs were checked
