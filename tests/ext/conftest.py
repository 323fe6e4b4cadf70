"""The extension tests need cmfast._C: they skip without it, and fail without it when CMFAST_REQUIRE_EXT=1 (CI)."""

import os
import sys
from pathlib import Path

import pytest

from cmfast import ops

# the kernel tests' shared poisoning helper and tolerance rule (tests/kernels/kernel_rules.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kernels"))


@pytest.fixture(autouse=True)
def extension_built():
    reason = ops._extension_reason()
    if reason and os.environ.get("CMFAST_REQUIRE_EXT") == "1":
        pytest.fail(f"CMFAST_REQUIRE_EXT=1 but {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)
