"""Run by tests/training/test_fsdp.py under torchrun with 2 gloo processes: `python fsdp_worker.py TEACHER OUT`.

The same consistency-distillation run (2 steps, global batch 8, 2 micro-batches per step) with DDP (recording when
it all-reduces, through a comm hook), with FSDP, and with FSDP stopped at step 1 and resumed.
Process 0 writes OUT/facts.json; each run writes its run directory under OUT.
"""

import json
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.tensor import DTensor

from cmfast.training.config import preset_config
from cmfast.training.distributed import shutdown
from cmfast.training.trainer import Trainer


def config(teacher: str, **kw):
    return preset_config(
        "digits-cd",
        teacher=teacher,
        total_steps=2,
        batch_size=8,
        log_every=1,
        checkpoint_every=1000,
        ema_rates=(0.9,),
        deterministic=True,
        **kw,
    )


def record_allreduces(trainer: Trainer) -> list[int]:
    """For each DDP all-reduce, how many micro-batches the online model had run forward by then (one forward each)."""
    micro, calls = [], []

    def hook(state, bucket):
        calls.append(len(micro))
        return default_hooks.allreduce_hook(state, bucket)

    trainer.model.register_forward_pre_hook(lambda module, args: micro.append(1))
    trainer.model.register_comm_hook(None, hook)
    return calls


def main(teacher: str, out: Path) -> None:
    trainer = Trainer(config(teacher, accum=2), out / "ddp2", progress=False, device="cpu")
    calls = record_allreduces(trainer)
    trainer.train()
    facts = {"allreduce_after_micro_batches": calls}

    fsdp = config(teacher, accum=2, sharding="fsdp")
    trainer = Trainer(fsdp, out / "fsdp", progress=False, device="cpu")
    online = list(trainer.online.parameters())
    facts["online_sharded"] = all(isinstance(p, DTensor) for p in online)
    facts["target_sharded"] = all(isinstance(p, DTensor) for p in trainer.target.parameters())
    facts["ema_sharded"] = all(isinstance(p, DTensor) for m in trainer.emas.values() for p in m.parameters())
    facts["teacher_replicated"] = not any(isinstance(p, DTensor) for p in trainer.teacher.parameters())
    facts["local_numel"] = sum(p.to_local().numel() for p in online)
    facts["full_numel"] = sum(p.numel() for p in online)
    trainer.train()

    Trainer(fsdp, out / "fsdp-split", progress=False, device="cpu").train(stop_at=1)
    resumed = Trainer(fsdp, out / "fsdp-split", resume=True, progress=False, device="cpu")
    facts["resumed_at"] = resumed.step
    resumed.train()
    if resumed.dist.is_main:
        (out / "facts.json").write_text(json.dumps(facts))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
