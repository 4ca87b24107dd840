"""The command lines ask glibc's malloc to keep freed memory (nni_harp._heap), unless the user set it."""
from __future__ import annotations

import ctypes
import platform

import pytest

import nni_harp._heap as heap
from nni_harp import cli, trial


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> _FakeLibc:
    libc = _FakeLibc()
    monkeypatch.setattr(heap.platform, "system", lambda: "Linux")
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: libc)
    return libc


def test_sets_both_thresholds(fake_libc: _FakeLibc) -> None:
    assert heap.keep_freed_memory({}) is True
    assert fake_libc.calls == [(-3, heap.MMAP_THRESHOLD), (-1, heap.TRIM_THRESHOLD)]


@pytest.mark.parametrize("environ", [
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"MALLOC_TRIM_THRESHOLD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
])
def test_a_users_own_setting_is_kept(fake_libc: _FakeLibc, environ: dict[str, str]) -> None:
    assert heap.keep_freed_memory(environ) is False
    assert fake_libc.calls == []


def test_other_tunables_do_not_stop_it(fake_libc: _FakeLibc) -> None:
    assert heap.keep_freed_memory({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) is True
    assert len(fake_libc.calls) == 2


def test_without_glibc_nothing_happens(monkeypatch: pytest.MonkeyPatch, fake_libc: _FakeLibc) -> None:
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: object())  # a C library without mallopt (musl, ...)
    assert heap.keep_freed_memory({}) is False
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: None)
    assert heap.keep_freed_memory({}) is False

    def unloadable(name: str) -> None:
        raise OSError("cannot load")

    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(heap.ctypes, "CDLL", unloadable)
    assert heap.keep_freed_memory({}) is False
    monkeypatch.setattr(heap.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: fake_libc)
    assert heap.keep_freed_memory({}) is False
    assert fake_libc.calls == []


@pytest.mark.skipif(platform.system() != "Linux" or not ctypes.util.find_library("c"), reason="needs Linux with a C library")
def test_applies_on_this_linux_machine() -> None:
    """The real call: glibc's mallopt accepts both values (musl's stub would answer 0)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        pytest.skip("this C library has no mallopt")
    assert heap.keep_freed_memory({}) is True


def test_both_command_lines_call_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    called: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: called.append("nni-harp") or True)
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: called.append("trial") or True)
    assert cli.main(["list-models", "resnet18"]) == 0
    # a bad parameter ends the trial with a user error, after the process was set up
    assert trial.main(["--param", "model=resnet18", "--param", "prune_epochs=-1"]) == cli.EXIT_USER_ERROR
    assert called == ["nni-harp", "trial"]
