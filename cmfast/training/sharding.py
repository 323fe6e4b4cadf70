"""FSDP2 (torch.distributed.fsdp.fully_shard) for the trainer's models, and its checkpoints.

`--sharding fsdp` shards the online model, the target and every EMA the same way: each block of the network (each
child of a ModuleList or ModuleDict: ADM's input/output blocks, the EDM U-Nets' encoder/decoder blocks) is one FSDP
unit and the model root another, so a forward gathers one block's weights at a time. RAdam's state follows the
online weights' shards. Because the three copies are sharded alike, the EMA updates run on local shards with no
communication. The CD teacher is not sharded: it is frozen and has neither gradients nor optimizer state, so a full
replica per process costs only its weights, and sharding it would add two all-gathers per Heun step.

Checkpoints are directories written with torch.distributed.checkpoint (each process writes its shards; they can be
loaded on another number of processes): checkpoints/ckpt-<step>.dcp/, holding DCP's files and meta.json (step,
optimizer hyper-parameters are in the DCP state). A directory is written under a temporary name and renamed when
complete, so a crash leaves the previous checkpoint as the newest. The exported model is gathered to one
safetensors file, as an unsharded run writes it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..io import atomic_write_bytes
from .state import ResumeError

DCP_NAME = re.compile(r"^ckpt-(\d{8})\.dcp$")


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Apply fully_shard to every block (child of a ModuleList/ModuleDict), innermost first, then to `model`."""
    mesh = init_device_mesh(device.type, (world,))
    for module in reversed(list(model.modules())):  # children before their parents, as FSDP2 asks
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            for child in module.children():
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU of process 0 (empty elsewhere); every process must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:08d}.dcp"


def list_sharded_checkpoints(run_dir: Path) -> list[Path]:
    """Complete sharded checkpoints of a run (DCP metadata and meta.json present), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if DCP_NAME.match(p.name) and p.is_dir()]
    return sorted(p for p in found if (p / ".metadata").is_file() and (p / "meta.json").is_file())


def _state(modules: dict[str, nn.Module], online: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    state = {name: module.state_dict() for name, module in modules.items()}
    state["optim"] = get_optimizer_state_dict(online, optimizer)
    return state


def save_sharded(
    run_dir: Path,
    step: int,
    modules: dict[str, nn.Module],
    online: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    keep: int,
    dist,
) -> Path:
    """Write checkpoint `step` collectively (every process calls it), then keep the newest `keep`."""
    final = sharded_checkpoint_path(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = _state(modules, online, optimizer)
    state["rng"] = {"cpu": torch.get_rng_state()}  # process 0's, restored everywhere, as unsharded runs do
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.is_main:
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta).encode())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_sharded_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(
    run_dir: Path, modules: dict[str, nn.Module], online: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Path, dict]:
    """Load the newest sharded checkpoint into the models and the optimizer (every process calls it); returns its
    path and meta.json."""
    found = list_sharded_checkpoints(run_dir)
    if not found:
        raise ResumeError(f"{run_dir}: no sharded checkpoints to resume from (expected checkpoints/ckpt-*.dcp)")
    path = found[-1]
    state = _state(modules, online, optimizer)
    state["rng"] = {"cpu": torch.get_rng_state()}
    dcp.load(state, checkpoint_id=str(path))
    for name, module in modules.items():
        module.load_state_dict(state[name])
    set_optimizer_state_dict(online, optimizer, optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    return path, json.loads((path / "meta.json").read_text())
