"""Dataset readers: ILSVRC2012 val (two layouts), PASCAL VOC 2007, and the bundled sample set."""

from .readers import open_dataset, read_ilsvrc, read_voc
from .records import (
    ImageRecord,
    load_example,
    localisation_filter,
    sample_records,
)

__all__ = ["ImageRecord", "load_example", "localisation_filter", "open_dataset", "read_ilsvrc",
           "read_voc", "sample_records"]
