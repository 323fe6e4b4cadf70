"""Shared test fixtures. Everything runs on CPU."""

import os

import pytest
import torch
from torch import nn

# Triton reads TRITON_INTERPRET when it is first imported (torch._dynamo imports it too), so the CPU interpreter has to
# be chosen before any test module runs; without CUDA, the kernel tests run through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class RecordingNet(nn.Module):
    """A small stand-in backbone F(x, noise_labels, class_labels): nonlinear, sigma-dependent, records its inputs."""

    def __init__(self, channels: int = 3, num_classes: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Embedding(max(num_classes, 1), channels)
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None):
        self.calls.append((x.detach().clone(), noise_labels.detach().clone()))
        h = torch.tanh(self.conv(x)) + torch.sin(noise_labels).reshape(-1, 1, 1, 1)
        if class_labels is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        return h


def perturb_(module: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Give every parameter random non-zero values, so zero-initialised output layers do not hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


@pytest.fixture
def recording_net():
    torch.manual_seed(0)
    return RecordingNet()


@pytest.fixture(scope="session")
def recording_net_class():
    """The RecordingNet class, for tests that build several or pass arguments."""
    return RecordingNet


@pytest.fixture(scope="session")
def perturb():
    """perturb_(module, seed=0, scale=0.05): random non-zero parameters, in place."""
    return perturb_
