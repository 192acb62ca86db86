"""Data: readers that decode whole datasets (image folders into a cache, in memory or memory-mapped), and the
batched on-device loader."""
from .datasets import (DATASETS, DatasetError, ImageDataset, has_validation_folder, load_dataset,
                       normalization_stats, read_cifar10, read_idx, search_paths, write_idx)
from .folder import read_image_folder
from .loader import Augment, Loader

__all__ = ["DATASETS", "DatasetError", "ImageDataset", "load_dataset", "normalization_stats", "read_cifar10",
           "read_idx", "read_image_folder", "search_paths", "write_idx", "Augment", "Loader", "has_validation_folder"]
