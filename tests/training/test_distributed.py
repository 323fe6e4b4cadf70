"""init_distributed's device choice, checked on the CPU against torch's own rule for torch.cuda.set_device.

On the H100 (torch 2.11) `Trainer(device="cuda")` failed: torch.cuda.set_device refuses a CUDA device without an index.
Here CUDA is faked, and the fake set_device applies the same validation torch does (torch._utils._get_device_index).
"""

import pytest
import torch

from cmfast.training import distributed


@pytest.fixture
def fake_cuda(monkeypatch):
    chosen = []

    def set_device(device):
        chosen.append(torch._utils._get_device_index(device, optional=False))  # raises as torch does without an index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return chosen


@pytest.mark.parametrize(
    "asked, local_rank, want",
    [("cuda", "0", "cuda:0"), ("cuda", "3", "cuda:3"), ("cuda:1", "3", "cuda:1"), (None, "2", "cuda:2")],
)
def test_cuda_without_an_index_is_this_process_gpu(fake_cuda, monkeypatch, asked, local_rank, want):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.init_distributed(asked)
    assert d.device == torch.device(want) and fake_cuda == [torch.device(want).index]
    assert d.world == 1 and d.is_main


def test_cpu_is_left_alone(fake_cuda, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed("cpu").device == torch.device("cpu") and fake_cuda == []
