"""Atomic writes leave the permissions a plain write would: umask for new files, the old mode for
replaced ones (mkstemp alone would make every output owner-only)."""
from __future__ import annotations

import os
import stat
import sys

import pytest
import torch

from nni_harp._io import atomic_save, atomic_write_text, safe_load

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_umask_mode(tmp_path, umask_022):
    text = atomic_write_text(tmp_path / "report.json", "{}")
    ckpt = atomic_save({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert _mode(text) == 0o644
    assert _mode(ckpt) == 0o644
    assert torch.equal(safe_load(ckpt)["w"], torch.ones(2))


def test_replaced_files_keep_their_mode(tmp_path, umask_022):
    path = tmp_path / "plan.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert _mode(path) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
