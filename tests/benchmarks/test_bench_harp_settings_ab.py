"""benchmarks/harp_settings_ab.py: bad variants are refused with one line, and the table gives
every run and the per-variant mean ± std of the PGD-20 accuracy after fine-tuning."""
from __future__ import annotations

import pytest
from _bench_loader import benchmark_module


@pytest.fixture(scope="module")
def ab():
    with benchmark_module("harp_settings_ab.py") as module:
        yield module


@pytest.mark.parametrize("variant", ["{not json", '{"gamma_0": -1}', '{"no_such_setting": 1}'])
def test_a_bad_variant_exits_2_with_one_line(ab, capsys, variant: str) -> None:
    assert ab.main([variant]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harp_settings_ab.py: bad settings variant") and err.count("\n") == 1 and "Traceback" not in err


def test_table_lists_runs_and_means_per_variant(ab) -> None:
    runs = [{"seed": s, "settings": v, "frozen_at": 9, "loss": [1.0] * 20, "kept": [0.5 - 0.01 * i for i in range(20)],
             "before": [0.9, 0.3], "ft_epoch": 2, "after": [0.95, pgd]}
            for v, pgds in (({}, (0.4, 0.6)), ({"norm_lr": 0.01}, (0.7, 0.7))) for s, pgd in enumerate(pgds)]
    text = ab.table("structured", 0.75, 20, runs, "python benchmarks/harp_settings_ab.py x")
    rows = [line for line in text.splitlines() if line.startswith("| `{")]
    assert len(rows) == 4 + 2
    assert "| 1 | 1.0 1.0 1.0 1.0 1.0 | 0.5 0.45 0.4 0.35 0.31 | 9 | 90.0 / 30.0 | 2 | 95.0 / 60.0 |" in rows[1]
    assert rows[4] == "| `{}` | 50.0 ± 14.1 |" and rows[5] == '| `{"norm_lr": 0.01}` | 70.0 ± 0.0 |'
