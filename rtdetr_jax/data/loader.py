"""Batches of fixed shape for jit: pixel values, ground truth padded to `max_boxes`, image ids and sizes.

Deterministic for a seed: the epoch's order comes from (seed, epoch), each sample's augmentation from
(seed, epoch, position), the multi-scale size of a batch from (seed, epoch, batch). So a run resumed at
(epoch, batch) sees exactly the batches an uninterrupted run would. Samples are decoded and augmented by a thread
pool, several batches ahead of the training step (PIL and numpy release the GIL for the heavy parts).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import warnings
from collections.abc import Iterator

import numpy as np

from rtdetr_jax.data.coco import CocoDetection
from rtdetr_jax.data.transforms import eval_transform, train_transform
from rtdetr_jax.loss.criterion import SAFE_BOX, Targets
from rtdetr_jax.processing import ImageLoadError



@dataclasses.dataclass
class Batch:
    pixel_values: np.ndarray  # (batch, 3, size, size) float32 in [0, 1]
    targets: Targets  # numpy, padded to max_boxes
    image_ids: np.ndarray  # (batch,) int; -1 for filler samples of a last partial eval batch
    sizes: np.ndarray  # (batch, 2) original (height, width)
    epoch: int
    index: int  # batch index within the epoch


@dataclasses.dataclass
class LoaderConfig:
    batch_size: int = 4
    image_size: int = 640
    max_boxes: int = 100
    train: bool = True
    seed: int = 0
    stop_strong_aug_epoch: int | None = None  # strong augmentation off from this epoch on
    multi_scale_sizes: tuple[int, ...] = ()  # e.g. (480, 512, ..., 800); empty: always image_size
    workers: int = 2
    prefetch_batches: int = 2

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        for s in (self.image_size, *self.multi_scale_sizes):
            if s < 32 or s % 32:
                raise ValueError(f"image size {s} must be a positive multiple of 32")


class DetectionLoader:
    def __init__(self, dataset: CocoDetection, config: LoaderConfig):
        self.dataset = dataset
        self.config = config
        self.skipped = collections.Counter()  # image load failures and truncated box lists

    def batches_per_epoch(self) -> int:
        n, b = len(self.dataset), self.config.batch_size
        return n // b if self.config.train else -(-n // b)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.config.train:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.dataset))

    def _size(self, epoch: int, index: int) -> int:
        sizes = self.config.multi_scale_sizes
        if not self.config.train or not sizes:
            return self.config.image_size
        # the authors' BatchImageCollateFunction: multi-scale until the stop epoch, then the base size
        stop = self.config.stop_strong_aug_epoch
        if stop is not None and epoch >= stop:
            return self.config.image_size
        return int(np.random.default_rng([self.config.seed, epoch, index, 1]).choice(sizes))

    def _sample(self, i: int, epoch: int, position: int, size: int):
        cfg = self.config
        # a corrupt image is replaced by the next one in the order (deterministically), with a warning
        for attempt in range(len(self.dataset)):
            j = (i + attempt) % len(self.dataset)
            try:
                image, boxes, labels, image_id = self.dataset.sample(j)
                break
            except ImageLoadError as err:
                self.skipped["unreadable image"] += 1
                warnings.warn(f"skipping {err}", stacklevel=2)
        else:
            raise ImageLoadError(f"{self.dataset.image_dir}: no readable image")
        height, width = image.size[1], image.size[0]
        if cfg.train:
            strong = cfg.stop_strong_aug_epoch is None or epoch < cfg.stop_strong_aug_epoch
            rng = np.random.default_rng([cfg.seed, epoch, position, 0])
            pixels, cxcywh, labels = train_transform(image, boxes, labels, size, rng, strong)
        else:
            pixels, cxcywh, labels = eval_transform(image, boxes, labels, size)
        if len(labels) > cfg.max_boxes:
            self.skipped["boxes beyond max_boxes"] += len(labels) - cfg.max_boxes
            cxcywh, labels = cxcywh[: cfg.max_boxes], labels[: cfg.max_boxes]
        return pixels, cxcywh, labels, image_id, (height, width)

    def _batch(self, epoch: int, index: int) -> Batch:
        cfg = self.config
        order = self._order(epoch)
        positions = list(range(index * cfg.batch_size, (index + 1) * cfg.batch_size))
        size = self._size(epoch, index)
        pixel_values = np.zeros((cfg.batch_size, 3, size, size), np.float32)
        labels = np.zeros((cfg.batch_size, cfg.max_boxes), np.int32)
        boxes = np.tile(np.asarray(SAFE_BOX, np.float32), (cfg.batch_size, cfg.max_boxes, 1))
        mask = np.zeros((cfg.batch_size, cfg.max_boxes), bool)
        image_ids = np.full((cfg.batch_size,), -1, np.int64)
        sizes = np.ones((cfg.batch_size, 2), np.int64)
        for row, pos in enumerate(positions):
            if pos >= len(order):  # last eval batch: filler rows, ignored by evaluation
                continue
            pixels, cxcywh, lab, image_id, hw = self._sample(int(order[pos]), epoch, pos, size)
            n = len(lab)
            pixel_values[row] = pixels
            labels[row, :n] = lab
            boxes[row, :n] = cxcywh
            mask[row, :n] = True
            image_ids[row] = image_id
            sizes[row] = hw
        return Batch(pixel_values, Targets(labels, boxes, mask), image_ids, sizes, epoch, index)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start..` of `epoch`, prepared in the background `prefetch_batches` ahead."""
        total = self.batches_per_epoch()
        cfg = self.config
        if cfg.workers <= 0:
            for index in range(start, total):
                yield self._batch(epoch, index)
            return
        with concurrent.futures.ThreadPoolExecutor(cfg.workers) as pool:
            pending = collections.deque()
            next_index = start
            while next_index < total or pending:
                while next_index < total and len(pending) < cfg.prefetch_batches + 1:
                    pending.append(pool.submit(self._batch, epoch, next_index))
                    next_index += 1
                yield pending.popleft().result()
