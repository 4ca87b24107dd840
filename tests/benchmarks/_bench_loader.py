"""Loading a script of benchmarks/ as a module, with benchmarks/ importable while it is in use."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(script: str) -> Iterator[ModuleType]:
    """``benchmarks/<script>`` loaded as module ``bench_<stem>`` (registered in ``sys.modules`` so its
    dataclasses resolve their annotations); benchmarks/ is on ``sys.path`` until the block ends."""
    name = f"bench_{Path(script).stem}"
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(BENCH))
