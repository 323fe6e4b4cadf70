"""FSDP2 with 2 gloo processes on the CPU (tests/training/fsdp_worker.py, one torchrun launch): distillation with
--sharding fsdp and --accum 2 matches DDP and the one-process run; the online, target and EMA weights are sharded and
the teacher replicated; a sharded run stopped and resumed from its torch.distributed.checkpoint directory is
bit-exact; the export is one ordinary safetensors file; DDP all-reduces once per optimizer step when accumulating."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cmfast
from cmfast.training.config import preset_config
from cmfast.training.sharding import list_sharded_checkpoints
from cmfast.training.trainer import Trainer

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's runs, a one-process reference (no accumulation) and the initial student weights."""
    root = tmp_path_factory.mktemp("fsdp")
    edm = preset_config("digits-edm", total_steps=2, batch_size=8, checkpoint_every=1000, ema_rates=(0.9,))
    teacher = str(Trainer(edm, root / "teacher", progress=False).train())
    single = preset_config(
        "digits-cd", teacher=teacher, total_steps=2, batch_size=8, log_every=1, checkpoint_every=1000, ema_rates=(0.9,)
    )
    initial = Trainer(single, root / "initial", progress=False).online.net.state_dict()
    Trainer(single, root / "single", progress=False).train()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*launch, str(WORKER), teacher, str(root)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, initial


def exported(run: Path, name: str = "online") -> dict[str, torch.Tensor]:
    return load_file(str(run / f"{name}.safetensors"))


def test_fsdp_matches_ddp_and_one_process(runs):
    root, initial = runs
    single, ddp, fsdp = (exported(root / d) for d in ("single", "ddp2", "fsdp"))
    assert single.keys() == ddp.keys() == fsdp.keys()
    moved = 0
    for key, value in initial.items():
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(fsdp[key], value))
    assert moved > 10  # the runs trained
    for name in ("model",):  # the EMA, gathered from its shards
        a, b = exported(root / "ddp2", name), exported(root / "fsdp", name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    logs = [
        [json.loads(x)["loss"] for x in (root / d / "log.jsonl").read_text().splitlines()] for d in ("ddp2", "fsdp")
    ]
    assert logs[1] == pytest.approx(logs[0], rel=1e-5)


def test_what_is_sharded(runs):
    facts = json.loads((runs[0] / "facts.json").read_text())
    assert facts["online_sharded"] and facts["target_sharded"] and facts["ema_sharded"]
    assert facts["teacher_replicated"]
    assert facts["local_numel"] < 0.6 * facts["full_numel"]  # this process holds about half


def test_sharded_resume_is_bit_exact(runs):
    root = runs[0]
    assert json.loads((root / "facts.json").read_text())["resumed_at"] == 1
    assert [p.name for p in list_sharded_checkpoints(root / "fsdp-split")] == ["ckpt-00000001.dcp", "ckpt-00000002.dcp"]
    for name in ("online", "model"):
        a, b = exported(root / "fsdp", name), exported(root / "fsdp-split", name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_the_export_is_one_plain_file(runs):
    model = cmfast.load(runs[0] / "fsdp" / "model.safetensors")
    assert isinstance(model, cmfast.ConsistencyModel)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(x, torch.full((2,), 2.0))).all()


def test_ddp_synchronises_only_on_the_last_micro_batch(runs):
    """With 2 micro-batches per step, every all-reduce comes after an even number of micro-batches: none on the first
    micro-batch of a step (no_sync), and at least one in each of the 2 steps."""
    calls = json.loads((runs[0] / "facts.json").read_text())["allreduce_after_micro_batches"]
    assert calls and all(c % 2 == 0 for c in calls)
    assert set(calls) == {2, 4}
