"""Datasets: readers of ILSVRC2012 val (two layouts) and PASCAL VOC 2007, the bundled ``sample``
dataset (photos from installed packages in the ILSVRC layout), and image records."""

from .datasets import DATASETS, open_dataset
from .readers import read_ilsvrc, read_voc
from .records import (
    POINTING_STATUSES,
    ImageRecord,
    draw_records,
    load_example,
    localisation_filter,
    pointing_status,
)

__all__ = ["DATASETS", "POINTING_STATUSES", "ImageRecord", "draw_records", "load_example",
           "localisation_filter", "open_dataset", "pointing_status", "read_ilsvrc", "read_voc"]
