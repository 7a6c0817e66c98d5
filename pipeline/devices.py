"""``--device`` values as torch devices, for both stages (``pipeline.options.check_device`` refuses a bad
value at parse time; this turns a good one into a device where the work starts), and the thread count of
both stages' DataLoader workers."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" is the first CUDA GPU when one is visible, else the CPU; anything else is torch's own name."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def single_thread_worker(_worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` of both stages: a worker renders views with PIL on one thread,
    leaving the cores to the model the main process runs (the teacher in precompute, the student in train)."""
    torch.set_num_threads(1)
