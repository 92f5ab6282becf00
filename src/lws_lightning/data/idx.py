"""Checks, loading and download of the IDX files of torchvision's MNIST-family datasets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torchvision.datasets import MNIST

from lws_lightning.data.download import RemoteFile, fetch, gunzip, move_into, staging_folder
from lws_lightning.errors import CorruptDataError

log = logging.getLogger(__name__)

# Bytes per value of each IDX type code, the codes that torchvision's IDX reader accepts.
_IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def check_idx_file(path: Path) -> None:
    """Raise CorruptDataError unless ``path`` has a valid IDX header and the size it declares.

    Reads only the header and the file size, so it is cheap for files of any size.
    """
    with path.open("rb") as handle:
        magic = handle.read(4)
        problem = None
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_ITEM_BYTES:
            problem = f"the header {magic.hex() or '(empty)'} is not an IDX magic number"
        else:
            num_dims = magic[3]
            dims_bytes = handle.read(4 * num_dims)
            if num_dims == 0 or len(dims_bytes) < 4 * num_dims:
                problem = "the header ends before its dimensions"
            else:
                dims = np.frombuffer(dims_bytes, dtype=">u4").astype(np.int64)
                expected = 4 + 4 * num_dims + int(np.prod(dims)) * _IDX_ITEM_BYTES[magic[2]]
                actual = path.stat().st_size
                if actual != expected:
                    problem = (
                        f"the header declares shape {tuple(dims.tolist())}, which needs "
                        f"{expected} bytes, but the file has {actual}"
                    )
    if problem is not None:
        raise CorruptDataError(
            f"{path} is not a valid IDX file: {problem}. The file is truncated or damaged. "
            "Delete it and fetch it again."
        )


def missing_files(folder: Path, names: Sequence[str]) -> list[str]:
    """Return the names in ``names`` that are not files in ``folder``."""
    return [name for name in names if not (folder / name).is_file()]


def load_idx_dataset(build: Callable[[], MNIST], folder: Path, names: Sequence[str]) -> MNIST:
    """Check the IDX files ``names`` in ``folder``, then build a torchvision dataset from them.

    Args:
        build: Builds the torchvision dataset with ``download=False``.
        folder: The dataset's ``raw`` folder.
        names: IDX files the dataset reads.

    Raises:
        CorruptDataError: A file is damaged, or image and label counts differ.
    """
    for name in names:
        check_idx_file(folder / name)
    try:
        dataset = build()
    except (RuntimeError, ValueError, TypeError, AssertionError) as error:
        raise CorruptDataError(
            f"torchvision cannot read the IDX files in {folder}: {error}. Delete them and fetch "
            "them again."
        ) from error
    if len(dataset.data) != len(dataset.targets):
        raise CorruptDataError(
            f"The IDX files in {folder} hold {len(dataset.data)} images but "
            f"{len(dataset.targets)} labels. Delete them and fetch them again."
        )
    return dataset


def remote_gz_files(dataset_class: type[MNIST]) -> list[RemoteFile]:
    """List the gzipped IDX files of a torchvision MNIST-family class with all its mirrors."""
    return [
        RemoteFile(name, tuple(mirror + name for mirror in dataset_class.mirrors), md5)
        for name, md5 in dataset_class.resources
    ]


def download_gz_files(
    root: Path, dataset: str, raw_folder: Path, remotes: list[RemoteFile]
) -> None:
    """Download gzipped IDX files and install them uncompressed into ``raw_folder``.

    ``raw_folder`` must lie under ``root``. Nothing appears there unless every file arrived.
    """
    relative = raw_folder.relative_to(root)
    with staging_folder(root, dataset) as staging:
        for remote in remotes:
            archive = fetch(remote, staging, dataset)
            gunzip(archive, staging / relative / remote.name.removesuffix(".gz"))
            archive.unlink()
        move_into(staging / relative, raw_folder)
    log.info("Installed %s into %s", dataset, raw_folder)
