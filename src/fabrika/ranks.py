"""Which process this is under a multi-process launcher (accelerate launch, torchrun, srun), and how
`fabrika run` coordinates the processes.

The launcher tells each process its place through environment variables (WORLD_SIZE, RANK,
LOCAL_RANK); without one, the process is rank 0 of 1.

Every process of the launch runs the pipeline, but only training stages need them all: rank 0 runs
the other stages alone (a collect or an export must not run, or be paid for, once per GPU) and
tells the other ranks, through files in the run directory, when to join a training stage and when
to move on. Files, not collective calls: the others may wait for hours while rank 0 collects, far
longer than any NCCL timeout, and they join only once rank 0 has reset or resumed the stage's
directory. The run directory must be shared by every node, as the training inputs already are.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from fabrika.artifacts import atomic_write_text
from fabrika.errors import FabrikaError

JOIN, NEXT, ABORT = "join", "next", "abort"
POLL_S = 0.5


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """The process's index on its node: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def leave_process_group() -> None:
    """Destroy the launch's process group, if this process joined one, before the interpreter exits:
    left to the interpreter's teardown, the communicator's threads may be torn down in any order
    (PyTorch asks for this call; NCCL warns without it). Called only after a command succeeded: on
    failure another rank may still sit in a collective, and the launcher ends every process anyway."""
    import sys

    if "torch.distributed" not in sys.modules:  # commands that never trained did not import it
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    def __init__(self, run_dir: Path) -> None:
        self.leader = is_main_process()
        self.dir: Path | None = None
        if world_size() > 1:
            root = run_dir / ".ranks"
            self.dir = root / _launch_id(self.leader)
            if self.leader:  # messages of earlier launches are dead; this one's directory is new
                shutil.rmtree(root, ignore_errors=True)
                self.dir.mkdir(parents=True)

    def tell(self, stage: str, word: str) -> None:
        """Rank 0: `join` (the stage directory is ready, train together) or `next` (done or skipped)."""
        if self.dir is not None:
            atomic_write_text(self.dir / f"{stage}.{word}", "")

    def abort(self, reason: str) -> None:
        if self.dir is not None:
            atomic_write_text(self.dir / ABORT, reason)

    def hear(self, stage: str) -> str:
        """The other ranks: wait for rank 0's word on this stage."""
        assert self.dir is not None
        while True:
            for word in (JOIN, NEXT):
                if (self.dir / f"{stage}.{word}").exists():
                    return word
            if (self.dir / ABORT).exists():
                raise FabrikaError(f"rank 0 stopped the run ({stage!r} and later stages will not run): "
                                   f"{(self.dir / ABORT).read_text(encoding='utf-8').strip()}")
            time.sleep(POLL_S)


def _launch_id(leader: bool) -> str:
    """One id per launch, chosen by rank 0 and broadcast over the process group the training stages
    will use anyway (accelerate's, with the launcher's backend and device)."""
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()
    box = [uuid.uuid4().hex if leader else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])
