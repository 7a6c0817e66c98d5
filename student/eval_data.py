"""Evaluation data: the validation source's images (resize, centre crop: the recipe's eval transform),
this rank's share, in batches whose undecodable images are left out; same classes as training."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.devices import single_thread_worker
from pipeline.recipes import Recipe
from pipeline.sources import (
    Manifest,
    SampleReader,
    SourceError,
    Undecodable,
    check_same_classes,
    decode_image,
    index_source,
    source_errors_in_one_line,
)
from pipeline.views import ViewRenderer
from storage.bucket import worker_start

from .train_data import TrainData


# ---- evaluation --------------------------------------------------------------------------
class EvalImages(torch.utils.data.Dataset):
    """Every ``world``-th sample of a validation source (from ``rank``), eval-transformed."""

    def __init__(self, manifest: Manifest, recipe: Recipe, rank: int = 0, world: int = 1):
        self.files, self.recipe = SampleReader(manifest), recipe
        self.index = np.arange(rank, len(self.files), world)
        self.shard_of = np.searchsorted(self.files.starts, np.arange(len(self.files)), side="right") - 1
        self._transform = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        row = int(self.index[i])
        shard = int(self.shard_of[row])
        if self._transform is None:
            self._transform = ViewRenderer(self.recipe).eval_transform()
        try:
            data = self.files.read(shard, row - int(self.files.starts[shard]))
        except SourceError:  # an unreadable file (permission): an error, never a silently dropped image
            raise
        except Exception:  # noqa: BLE001 - unreadable now (a tar gone): left out, like an undecodable image
            return None
        img = decode_image(data)
        if isinstance(img, Undecodable):
            return None
        return self._transform(img), int(self.files.labels[row])


def _collate_valid(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    x, y = zip(*items, strict=True)
    return torch.stack(x), torch.tensor(y)


def eval_loader(val: str, train: TrainData, *, batch_size: int, rank: int = 0, world: int = 1,
                workers: int = 0, shard_size: int = 1024, pin_memory: bool = False):
    """Batches (images, labels) of the validation source, this rank's share; same classes as training."""
    manifest = index_source(val, shard_size=shard_size, seed=train.seed, checksums=False)
    check_same_classes(train.manifest, manifest, val_src=val)
    ds = EvalImages(manifest, train.recipe, rank, world)
    return _OneLineSourceErrors(torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate_valid,
        worker_init_fn=single_thread_worker, pin_memory=pin_memory,
        multiprocessing_context=worker_start(workers)))


class _OneLineSourceErrors:
    """A DataLoader whose workers' SourceErrors surface as their own one line (see source_errors_in_one_line)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return source_errors_in_one_line(self.loader)
