"""evaluate_robustness and the torchattacks-backed AutoAttack."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nni_harp.adversarial import (
    AUTOATTACK_VERSIONS,
    AttackConfig,
    AttackConfigError,
    AutoAttackError,
    InputError,
    RobustnessReport,
    UnknownNameError,
    autoattack_examples,
    evaluate_robustness,
)

ATTACK = AttackConfig(norm="linf", eps=0.1, step_size=0.025, steps=10)


def _loader(test_batch: tuple[Tensor, Tensor], batch_size: int) -> DataLoader:
    x, y = test_batch
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def test_fast_evaluation_counts_and_orderings(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    report = evaluate_robustness(
        trained_model, _loader(test_batch, 20), ATTACK, max_batches=3, autoattack_version="apgd-ce"
    )
    assert report.n == 60  # three batches of 20, the fourth one not read
    for accuracy in (report.clean, report.pgd, report.autoattack):
        assert accuracy is not None
        assert accuracy * report.n == pytest.approx(round(accuracy * report.n))  # whole counts
    assert report.clean >= report.pgd
    assert report.autoattack <= report.clean
    assert report.clean > 0.8  # the tiny model is trained; otherwise the orderings prove little
    assert report.pgd < report.clean  # eps=0.1 breaks some of it
    assert report.to_dict() == {"clean": report.clean, "pgd": report.pgd, "autoattack": report.autoattack, "n": 60}


def test_standard_autoattack_on_a_handful_of_samples(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = test_batch
    report = evaluate_robustness(trained_model, [(x[:6], y[:6])], ATTACK, autoattack=True)
    assert report.n == 6 and report.autoattack is not None
    assert report.autoattack <= report.clean


def test_evaluation_leaves_the_model_and_rng_as_they_were(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]
) -> None:
    trained_model.train()
    trained_model[1].eval()
    trained_model[0].weight.requires_grad_(False)
    no_random_start = AttackConfig(norm="linf", eps=0.1, step_size=0.025, steps=10, random_start=False)
    x, y = test_batch
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32])]  # a list: a DataLoader iterator draws from the RNG
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    evaluate_robustness(trained_model, batches, no_random_start, max_batches=1, autoattack_version="apgd-ce+apgd-t")
    assert torch.equal(torch.get_rng_state(), rng_before), "torchattacks reseeded the global RNG"
    assert trained_model.training and not trained_model[1].training
    assert [p.requires_grad for p in trained_model.parameters()] == [False] + [True] * 5
    assert all(p.grad is None for p in trained_model.parameters())


@pytest.mark.parametrize(("norm", "version"), [("linf", "standard"), ("l2", "apgd-ce+apgd-t")])
def test_autoattack_examples_respect_eps_and_leave_no_trace(
    trained_model: nn.Module,
    test_batch: tuple[Tensor, Tensor],
    norm: str,
    version: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = test_batch
    attack = AttackConfig(norm=norm, eps=0.1 if norm == "linf" else 0.8, step_size=0.02)
    fab_runs: list[int] = []
    fab_perturb = torchattacks.FAB.perturb

    def counting_perturb(self: torchattacks.FAB, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fab_runs.append(len(images))
        return fab_perturb(self, images, labels)

    monkeypatch.setattr(torchattacks.FAB, "perturb", counting_perturb)
    # Square (5000 queries, no gradients) is what makes 'standard' slow; it is not under test here
    monkeypatch.setattr(torchattacks.Square, "perturb", lambda self, images, labels: images.clone())
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    x_adv = autoattack_examples(trained_model, x[:8], y[:8], attack, n_classes=10, version=version)
    flat = (x_adv - x[:8]).flatten(1)
    size = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
    assert float(size.max()) <= attack.eps * (1 + 1e-4) + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert torch.equal(torch.get_rng_state(), rng_before), "torchattacks reseeded the global RNG"
    # FAB calls .backward(); with the parameters frozen no gradient lands on them
    assert all(p.grad is None for p in trained_model.parameters())
    assert all(p.requires_grad for p in trained_model.parameters())
    if version == "standard":
        assert fab_runs, "FAB-T never ran, so the gradient check above proves nothing"


def test_without_autoattack_the_field_is_none(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    report = evaluate_robustness(trained_model, _loader(test_batch, 32), ATTACK, autoattack=False, max_batches=1)
    assert report.autoattack is None and report.n == 32
    assert report.to_dict()["autoattack"] is None


def test_errors_name_the_problem(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, y = test_batch
    with pytest.raises(UnknownNameError) as info:
        evaluate_robustness(trained_model, [(x[:4], y[:4])], ATTACK, autoattack_version="fast")
    assert all(repr(v) in str(info.value) for v in AUTOATTACK_VERSIONS)
    with pytest.raises(AutoAttackError, match="apgd-ce"):
        autoattack_examples(trained_model, x[:4], y[:4], ATTACK, n_classes=3, version="standard")
    with pytest.raises(InputError, match="no samples"):
        evaluate_robustness(trained_model, [], ATTACK)
    with pytest.raises(AttackConfigError, match="max_batches"):
        evaluate_robustness(trained_model, [(x[:4], y[:4])], ATTACK, max_batches=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"clean": 1.5}, "clean"), ({"pgd": -0.1}, "pgd"), ({"autoattack": 2.0}, "autoattack"), ({"n": 0}, "n")],
)
def test_report_validation(kwargs: dict, field: str) -> None:
    values = {"clean": 0.9, "pgd": 0.5, "autoattack": 0.4, "n": 10, **kwargs}
    with pytest.raises(AttackConfigError, match=field):
        RobustnessReport(**values)
