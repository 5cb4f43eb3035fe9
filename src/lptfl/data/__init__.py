"""Data layer: dataset files -> normalised tensors (checksummed download, strict parsing) and
per-client partitions (Dirichlet with the paper's balancing, IID)."""

from .datasets import DATASET_NAMES, Dataset, canonical_name, load_dataset
from .download import MIRROR_ENV, download_dataset
from .errors import DatasetError, MissingFilesError
from .partition import dirichlet_partition, iid_partition, partition_summary

__all__ = [
    "DATASET_NAMES",
    "MIRROR_ENV",
    "Dataset",
    "DatasetError",
    "MissingFilesError",
    "canonical_name",
    "dirichlet_partition",
    "download_dataset",
    "iid_partition",
    "load_dataset",
    "partition_summary",
]
