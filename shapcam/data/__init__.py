"""Datasets: readers of ILSVRC2012 val (two layouts) and PASCAL VOC 2007, the bundled ``sample``
dataset (photos from installed packages in the ILSVRC layout), and image records."""

from .datasets import DATASETS, open_dataset
from .readers import read_ilsvrc, read_voc
from .records import ImageRecord, draw_records, load_example, localisation_filter

__all__ = ["DATASETS", "ImageRecord", "draw_records", "load_example", "localisation_filter",
           "open_dataset", "read_ilsvrc", "read_voc"]
