"""Training checkpoints: one safetensors file per checkpoint, written atomically, no pickle.

Tensors: every module's weights under a prefix ("online/", "target/", "ema/0.999/"), the optimizer's per-parameter
state ("optim/<index>/<name>") and the RNG states ("rng/cpu", "rng/cuda<i>"). The header's JSON metadata holds the
step, the optimizer's hyper-parameters, the loss scaler and anything else that is not a tensor.

The header also holds the SHA-256 of the tensor data ("sha256"), checked on loading. The last `keep` checkpoints are
kept. Loading tries the newest first; an unreadable (truncated) or corrupted one is reported and the one before it is
used.

A run directory has one writer at a time: `RunLock` holds the file `lock` (the owner's pid and host) while a run
writes there; a lock whose pid is no longer alive on this host is stale and taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of CPU tensors, in name order (what a checkpoint stores)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
    """Atomically write checkpoint `step` with its tensors' SHA-256, then delete all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**meta, "sha256": tensors_sha256(tensors)}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"cmfast-train": json.dumps(meta)}))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of one checkpoint; raises ValueError naming the file when it is unreadable or its tensors
    do not match the stored SHA-256 (checkpoints without one, from older versions, are not checked)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["cmfast-train"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"{path}: unreadable training checkpoint ({type(err).__name__}: {err})")
    if "sha256" in meta and tensors_sha256(tensors) != meta["sha256"]:
        raise ValueError(f"{path}: corrupted training checkpoint (its tensors do not match the stored SHA-256)")
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


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporaries of interrupted atomic writes (`.<name>.<random>.tmp` files, and `.<name>.tmp`
    directories of sharded checkpoints); call only while holding the run's lock, when no write can be in flight."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
                elif p.name.startswith(".") and p.name.endswith(".dcp.tmp") and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
    return removed


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of log.jsonl after `step` (a resumed run replays those steps and logs them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: the file `lock`, created atomically, holding the owner's pid and host.

    A lock left by a process that is no longer alive on this host is stale and taken over; one held by a live process
    (or by another host, whose processes cannot be checked) is refused with a TrainingError.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then creation is tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is not None and not self._stale(other):
                    raise TrainingError(
                        f"{self.path.parent} is in use by process {other.get('pid')} on {other.get('host')} "
                        f"(lock file {self.path}); wait for it to end, or delete the lock file if that run is gone"
                    )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.owner, fh)
            self.held = True
            return self
        raise TrainingError(f"cannot take the lock {self.path}: another process keeps replacing it")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # unreadable or half-written: treated as stale below

    def _stale(self, other: dict) -> bool:
        if not isinstance(other.get("pid"), int):  # unreadable: stale, unless its owner may still be writing it
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        return other.get("host") == self.owner["host"] and not pid_alive(other["pid"])

    def release(self) -> None:
        if self.held and self._read() == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False
