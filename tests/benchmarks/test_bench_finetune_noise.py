"""benchmarks/finetune_noise.py: bad method lists are refused with one line, and the table gives
every fine-tuning's PGD-20 with the spreads it names."""
from __future__ import annotations

import pytest
from _bench_loader import benchmark_module


@pytest.fixture(scope="module")
def noise():
    with benchmark_module("finetune_noise.py") as module:
        yield module


@pytest.mark.parametrize(("argv", "needle"), [
    (["--methods", "no-such-method"], "no structured method no-such-method"),
    (["--methods", "lamp"], "no structured method lamp"),
    (["--methods", "harp-alloc-mag,harp"], "harp-alloc-mag needs harp listed before it"),
])
def test_bad_methods_exit_2_with_one_line(noise, capsys, argv: list[str], needle: str) -> None:
    assert noise.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_table_gives_all_three_spreads(noise) -> None:
    runs = [{"seed": 0, "target": 0.75, "method": "harp", "pgd20": [60.0, 70.0]},
            {"seed": 1, "target": 0.75, "method": "harp", "pgd20": [80.0, 90.0]}]
    text = noise.table(runs, "structured", 20, "python benchmarks/finetune_noise.py x")
    row = [line for line in text.splitlines() if line.startswith("| 0.75 | harp |")]
    # all four: mean 75, std 12.9; seed means 65 and 85: std 14.1; within: each pair +-5 -> pooled 7.1
    assert row == ["| 0.75 | harp | 60.0 70.0; 80.0 90.0 | 75.0 ± 12.9 | 14.1 | 7.1 |"]
