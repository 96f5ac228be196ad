"""The data layer: layouts, BreakHis parsing, splits, the synthetic default and decoded arrays."""

from histoshield.data.arrays import cache_root, labels_of, load_arrays, to_float
from histoshield.data.layouts import load_imageset
from histoshield.data.records import ImageSet, Record, positive_index
from histoshield.data.splits import (
    format_split_summary,
    make_split,
    read_split,
    split_counts,
    split_summary,
    write_split,
)
from histoshield.data.summary import format_inspection, inspect_imageset
from histoshield.data.synthetic import synthesize, synthetic_dir

__all__ = [
    "ImageSet",
    "Record",
    "cache_root",
    "format_inspection",
    "format_split_summary",
    "inspect_imageset",
    "labels_of",
    "load_arrays",
    "load_imageset",
    "make_split",
    "positive_index",
    "read_split",
    "split_counts",
    "split_summary",
    "synthesize",
    "synthetic_dir",
    "to_float",
    "write_split",
]
