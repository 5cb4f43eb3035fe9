import subprocess
import sys

import pytest

from lptfl.experiment import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_are_raised_once_and_the_answer_is_remembered():
    code = (
        "from lptfl.experiment.allocator import keep_freed_memory\n"
        "import torch\n"
        "first = keep_freed_memory()\n"
        "x = torch.ones(8 << 20)\n"  # 32 MB: from the heap now, and kept there when freed
        "del x\n"
        "print(first, keep_freed_memory())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
    assert allocator.keep_freed_memory() is False
