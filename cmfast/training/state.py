"""Training checkpoints: one safetensors file per checkpoint, written atomically, no pickle.

Tensors: every module's weights under a prefix ("online/", "target/", "ema/0.999/"), the optimizer's per-parameter
state ("optim/<index>/<name>") and the RNG states ("rng/cpu", "rng/cuda<i>"). The header's JSON metadata holds the
step, the optimizer's hyper-parameters, the loss scaler and anything else that is not a tensor.

The last `keep` checkpoints are kept. Loading tries the newest first; an unreadable (truncated) one is reported and
the one before it is used.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..io import atomic_write_bytes

NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")


class ResumeError(RuntimeError):
    """No usable checkpoint to resume from."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps); the message says why."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:08d}.safetensors"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name))


def write_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
    """Atomically write checkpoint `step`, then delete all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"cmfast-train": json.dumps(meta)}))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of one checkpoint; raises ValueError naming the file when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["cmfast-train"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"{path}: unreadable training checkpoint ({type(err).__name__}: {err})")
    return tensors, meta


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The newest readable checkpoint of a run; unreadable newer ones are reported on stderr and skipped."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise ResumeError(f"{run_dir}: no checkpoints to resume from (expected checkpoints/ckpt-*.safetensors)")
    for path in reversed(candidates):
        try:
            tensors, meta = read_checkpoint(path)
        except ValueError as err:
            print(f"cmfast: warning: {err}; falling back to the checkpoint before it", file=sys.stderr)
            continue
        return path, tensors, meta
    raise ResumeError(f"{run_dir}: every checkpoint is unreadable: {', '.join(p.name for p in candidates)}")


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = f"{prefix}/"
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors and JSON (hyper-parameters, non-tensor per-parameter values)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{name}"] = value
            else:
                scalars[f"{index}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_tensors`: a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for key, value in unprefixed("optim", tensors).items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"rng/cuda{i}"] = torch.cuda.get_rng_state(i)
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng/cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng/cuda{i}"], i)
