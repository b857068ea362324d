"""The streaming data path: each image read and decoded once, in parallel with the compute.

A shard (the unit of storage and resume) is consumed as compute batches (images per forward,
chosen per device). :func:`decoded_batches` decodes the records on a small thread pool (PIL's
decoder and resampler release the GIL) and keeps at most ``lookahead`` batches decoded ahead of
the one being computed, so a batch's images are usually ready when the device asks for them and
the memory held is bounded by the batch size, not by the shard or the run.

Results do not depend on ``threads``: each image is decoded by the same function, and batches
come out in record order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import ShapCAMError
from ..zoo.preprocessing import INPUT_SIZE
from .records import ImageRecord, load_example

#: Images per compute batch when not given: small on CPU (the activations of a batch of 8 stay
#: in cache and under the allocator's mmap threshold: 64 images per forward were 2.3x slower per
#: image on the 2-core VM), large on GPU (fill the device).
CPU_IMAGE_BATCH = 8
GPU_IMAGE_BATCH = 64


def image_batch(device: str, requested: int | None = None) -> int:
    """``requested`` when given, else the default images per compute batch for ``device``."""
    if requested is not None:
        if requested < 1:
            raise ShapCAMError(f"images per batch must be >= 1, got {requested}")
        return requested
    return CPU_IMAGE_BATCH if str(device).startswith("cpu") else GPU_IMAGE_BATCH


def decode_threads(device: str, requested: int | None = None) -> int:
    """``requested`` when given (0: decode inline, no thread), else one background decoder on
    CPU (the cores are busy computing: decoding only needs to overlap) and up to 8 on GPU (the
    GPU outpaces one decoder: an ILSVRC JPEG takes 5-7 ms, Shap-CAM ~5 ms per image on an H200).
    """
    if requested is not None:
        if requested < 0:
            raise ShapCAMError(f"decode threads must be >= 0, got {requested}")
        return requested
    return 1 if str(device).startswith("cpu") else max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class Decoded:
    """One record of a shard after decoding: its input tensor and boxes, or why it failed."""

    index: int  #: position in the shard
    record: ImageRecord
    x: torch.Tensor | None = None  #: (3, H, W), preprocessed
    boxes: dict[int, torch.Tensor] = field(default_factory=dict)  #: per class, input frame
    size: tuple[int, int] | None = None  #: original (width, height)
    error: str | None = None


def decode(index: int, record: ImageRecord, size: int = INPUT_SIZE) -> Decoded:
    """Decode one record into the ``size`` x ``size`` frame; a corrupt or missing image is a
    :class:`Decoded` with ``error``."""
    try:
        x, boxes, original = load_example(record, size)
    except Exception as exc:  # noqa: BLE001 - any unreadable image is a per-image failure
        return Decoded(index, record, error=str(exc))
    return Decoded(index, record, x, boxes, original)


def decoded_batches(records: Sequence[ImageRecord], batch_size: int, threads: int = 1,
                    lookahead: int = 2, size: int = INPUT_SIZE) -> Iterator[list[Decoded]]:
    """``records`` decoded once each, in order, as lists of up to ``batch_size``.

    ``threads`` decoder threads keep up to ``lookahead`` batches decoded ahead of the consumer
    (``threads=0``: decode inline, nothing ahead). Leaving the loop early cancels what is
    still queued.
    """
    batches = [list(enumerate(records))[s:s + batch_size]
               for s in range(0, len(records), batch_size)]
    if threads == 0:
        for batch in batches:
            yield [decode(i, r, size) for i, r in batch]
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="shapcam-decode")
    queued: deque[list[Future[Decoded]]] = deque()
    try:
        for batch in batches:
            queued.append([pool.submit(decode, i, r, size) for i, r in batch])
            if len(queued) > lookahead:
                yield [f.result() for f in queued.popleft()]
        while queued:
            yield [f.result() for f in queued.popleft()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stack(batch: Sequence[Decoded], device: torch.device | str) -> torch.Tensor | None:
    """The decoded images of ``batch`` as one ``(B, 3, H, W)`` tensor on ``device`` (None when
    every image failed); pinned memory makes the copy to a GPU asynchronous."""
    xs = [d.x for d in batch if d.error is None]
    if not xs:
        return None
    x = torch.stack(xs)
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
