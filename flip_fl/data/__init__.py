"""Datasets and their split across clients.

- `dataset`: `ImageDataset`, the in-memory container every part of flip-fl uses;
- `sources`: the synthetic dataset and the torchvision loaders, selected by `data.name` (cached per process);
- `partition`: IID / Dirichlet splits and each client's local data.
"""

from flip_fl.data.dataset import ImageDataset
from flip_fl.data.partition import client_dataset, client_indices, partition, partition_dirichlet, partition_iid
from flip_fl.data.sources import load_datasets, load_torchvision, make_synthetic

__all__ = ["ImageDataset", "client_dataset", "client_indices", "load_datasets", "load_torchvision",
           "make_synthetic", "partition", "partition_dirichlet", "partition_iid"]
