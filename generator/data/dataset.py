"""Torch datasets over streamed rows: nothing holds the whole manifest in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..config import DataConfig
from .errors import BadRows
from .records import ManifestRow, Record
from .sources import iter_records
from .transforms import RecordTransform


class StreamingRecords(IterableDataset):
    """Records from a row source, loaded and transformed lazily, sharded across DataLoader workers.

    ``rows`` is a zero-argument callable returning a fresh row iterator (each epoch and each
    worker reads the source anew). Worker ``k`` of ``n`` takes rows ``k, k + n, ...``.
    """

    def __init__(
        self,
        rows: Callable[[], Iterator[ManifestRow]],
        data: DataConfig,
        train: bool = False,
        seed: int = 0,
        bad: BadRows | None = None,
    ):
        self.rows = rows
        self.data = data
        self.transform = RecordTransform(data, train=train, seed=seed)
        self.seed = seed
        self.bad = bad if bad is not None else BadRows(skip=data.skip_bad)

    def __iter__(self) -> Iterator[Record]:
        info = get_worker_info()
        rows = self.rows()
        if info is not None and info.num_workers > 1:
            rows = islice(rows, info.id, None, info.num_workers)
            self.transform.reseed(self.seed * 1000 + info.id)
        yield from iter_records(rows, self.transform, self.data.modalities, self.bad)


def collate_records(batch: list[Record]) -> dict:
    """Stack images; keep texts, modalities, findings and sources as lists."""
    return {
        "image": torch.stack([r["image"] for r in batch]),
        "text": [r["text"] for r in batch],
        "modality": [r["modality"] for r in batch],
        "findings": [r["findings"] for r in batch],
        "source": [r["source"] for r in batch],
    }
