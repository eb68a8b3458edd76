"""The run's device, ranks, precision and paths, decided once right after the flags are checked.
"""

from dataclasses import dataclass

import torch

from kit.device import pick_device, precision_context
from kit.distributed import init_distributed


@dataclass(frozen=True)
class RunSetup:
    """Where and how a run computes, and where it writes, decided once at its start: the
    device (under torchrun, this process's GPU), this process's rank and the world size, the
    precision context the losses and answers are computed in, and the output paths. The
    chapter's functions get these as their explicit arguments."""

    device: torch.device
    rank: int
    world_size: int
    ctx: object
    paths: dict

    def describe(self):
        """The device line the script prints."""
        if self.world_size == 1:
            return str(self.device)
        return f"{self.device.type} x {self.world_size} processes"


def setup_run(args, paths):
    """The run's `RunSetup` from --device and --precision: joins torchrun's process group when
    torchrun started this process."""
    device, rank, world_size = init_distributed(pick_device(args.device))
    return RunSetup(device, rank, world_size, precision_context(device, args.precision), paths)
