"""Omniglot split into one task per alphabet."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import Omniglot
from torchvision.transforms.v2.functional import resize

from lws_lightning.data.download import RemoteFile, fetch, move_into, staging_folder
from lws_lightning.data.multitask import MultiTaskDataModule
from lws_lightning.data.splits import seeded_order, split_group
from lws_lightning.data.tasks import TaskData
from lws_lightning.errors import CorruptDataError, DataNotFoundError, UserInputError

log = logging.getLogger(__name__)

SETS = ("images_background", "images_evaluation")
SIDE = 105
TRAIN_FRACTION = 0.8


class _OmniglotFolders(Omniglot):
    """torchvision's Omniglot that reads unpacked folders without their zip archives.

    torchvision checks the MD5 of ``images_background.zip`` or ``images_evaluation.zip`` before
    it reads the unpacked folder. This data module removes the archives after unpacking and
    checks every image as it decodes it, so only the folder has to exist.
    """

    def _check_integrity(self) -> bool:
        return os.path.isdir(os.path.join(self.root, self._get_target_folder()))


def omniglot_remotes() -> list[RemoteFile]:
    """Return torchvision's two Omniglot archives."""
    return [
        RemoteFile(f"{name}.zip", (f"{Omniglot.download_url_prefix}/{name}.zip",), md5)
        for name, md5 in Omniglot.zips_md5.items()
    ]


class _Alphabet:
    """Images of one alphabet inside a torchvision Omniglot dataset."""

    def __init__(self, dataset: Omniglot, name: str) -> None:
        self.dataset = dataset
        self.name = name
        # character folder name -> [(file name, index into the dataset)], both sorted.
        self.characters: dict[str, list[tuple[str, int]]] = {}

    def split(self, seed: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """Return dataset indices and labels of the training and test images."""
        train, train_labels, test, test_labels = [], [], [], []
        for label, character in enumerate(sorted(self.characters)):
            images = sorted(self.characters[character])
            if len(images) < 2:
                raise CorruptDataError(
                    f"{self._folder(character)} has {len(images)} images, but each Omniglot "
                    "character needs at least 2 to split into training and test images."
                )
            train_positions, test_positions = split_group(
                len(images), TRAIN_FRACTION, seed, self.name, character
            )
            train += [images[i][1] for i in train_positions]
            train_labels += [label] * len(train_positions)
            test += [images[i][1] for i in test_positions]
            test_labels += [label] * len(test_positions)
        return train, train_labels, test, test_labels

    def read(self, indices: list[int]) -> Tensor:
        """Decode images as ``[N, 1, 105, 105]`` uint8."""
        images = torch.empty(len(indices), 1, SIDE, SIDE, dtype=torch.uint8)
        for row, index in enumerate(indices):
            file_name, character = self.dataset._flat_character_images[index]
            path = Path(self.dataset.target_folder, self.dataset._characters[character], file_name)
            try:
                image, _ = self.dataset[index]
                pixels = np.asarray(image, dtype=np.uint8)
            except (OSError, ValueError) as error:
                raise CorruptDataError(
                    f"Cannot decode the Omniglot image {path}: {error}. Replace the file, or "
                    "delete the folder and fetch it again."
                ) from error
            if pixels.shape != (SIDE, SIDE):
                raise CorruptDataError(
                    f"The Omniglot image {path} is {pixels.shape[1]}×{pixels.shape[0]} pixels, but "
                    f"every Omniglot image is {SIDE}×{SIDE}. Replace the file."
                )
            images[row, 0] = torch.from_numpy(pixels.copy())
        return images

    def _folder(self, character: str) -> Path:
        return Path(self.dataset.target_folder, self.name, character)


def _index_alphabets(dataset: Omniglot) -> dict[str, _Alphabet]:
    # NOTE: `_characters` and `_flat_character_images` are private attributes of torchvision's
    # Omniglot, checked against torchvision 0.29. They map each image to its character folder.
    alphabets: dict[str, _Alphabet] = {}
    for index, (file_name, character) in enumerate(dataset._flat_character_images):
        alphabet_name, character_name = Path(dataset._characters[character]).parts
        alphabet = alphabets.setdefault(alphabet_name, _Alphabet(dataset, alphabet_name))
        alphabet.characters.setdefault(character_name, []).append((file_name, index))
    return alphabets


class OmniglotAlphabetsDataModule(MultiTaskDataModule):
    """One task per Omniglot alphabet, grayscale in [0, 1], the alphabet's characters as classes.

    The 30 background and 20 evaluation alphabets are read through torchvision's ``Omniglot``
    from ``root/omniglot-py/images_background`` and ``images_evaluation``. Characters, sorted
    by folder name, get labels 0..C-1. Each character's 20 images split 80/20 into training and
    test images, seeded by ``split_seed`` and the alphabet and character names, so a split does
    not depend on which other alphabets are loaded. Tasks follow a permutation of the sorted
    alphabet names seeded by ``split_seed``, and ``num_tasks`` keeps the first ones.

    Args:
        num_tasks: Number of alphabets to use, or None for all of them.
        image_size: Side of the square images in pixels. 105 keeps the original size.
        split_seed: Seed of the splits and of the task order. It is separate from ``seed``, so
            runs with different seeds train on the same examples.
        **kwargs: Arguments of :class:`MultiTaskDataModule`.
    """

    dataset_name = "omniglot_alphabets"

    def __init__(
        self,
        root: str,
        download: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        num_tasks: int | None = None,
        image_size: int = SIDE,
        split_seed: int = 0,
    ) -> None:
        super().__init__(root, download, batch_size, eval_batch_size, num_workers, pin_memory, seed)
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
            raise UserInputError(
                f"num_tasks={num_tasks!r} is invalid: use a positive number of alphabets, or "
                "null for all 50."
            )
        if not isinstance(image_size, int) or image_size < 1:
            raise UserInputError(
                f"image_size={image_size!r} is invalid: use a positive side length in pixels "
                f"({SIDE} keeps Omniglot's size)."
            )
        self.requested_tasks = num_tasks
        self.image_size = image_size
        self.split_seed = split_seed

    def ensure_files(self, download: bool) -> None:
        folder = self.root / Omniglot.folder
        missing = [name for name in SETS if not (folder / name).is_dir()]
        if not missing:
            return
        if not download:
            raise DataNotFoundError(
                self.missing_files_message(
                    f"the Omniglot folders {', '.join(missing)} are",
                    folder,
                    f"Offline, unpack {Omniglot.download_url_prefix}/<name>.zip there for each "
                    "missing folder.",
                )
            )
        remotes = [remote for remote in omniglot_remotes() if remote.name[:-4] in missing]
        with staging_folder(self.root, "Omniglot") as staging:
            for remote in remotes:
                archive = fetch(remote, staging, "Omniglot")
                try:
                    with zipfile.ZipFile(archive) as members:
                        members.extractall(staging / Omniglot.folder)
                except zipfile.BadZipFile as error:
                    raise CorruptDataError(
                        f"The Omniglot archive from {remote.urls[0]} is unusable: {error}. "
                        "Retry the download later."
                    ) from error
                archive.unlink()
            move_into(staging / Omniglot.folder, folder)
        log.info("Installed Omniglot into %s", folder)

    def load_tasks(self) -> list[TaskData]:
        alphabets: dict[str, _Alphabet] = {}
        for background in (True, False):
            dataset = _OmniglotFolders(str(self.root), background=background, download=False)
            for name, alphabet in _index_alphabets(dataset).items():
                if name in alphabets:
                    raise CorruptDataError(
                        f"The Omniglot alphabet {name!r} appears in both {SETS[0]} and {SETS[1]} "
                        f"under {self.root / Omniglot.folder}. Remove one of the copies."
                    )
                alphabets[name] = alphabet

        order = seeded_order(list(alphabets), self.split_seed)
        count = len(order) if self.requested_tasks is None else self.requested_tasks
        if count > len(order):
            raise UserInputError(
                f"num_tasks={count} is more than the {len(order)} Omniglot alphabets found under "
                f"{self.root / Omniglot.folder}. Use at most {len(order)}."
            )
        return [self._task(alphabets[name]) for name in order[:count]]

    def _task(self, alphabet: _Alphabet) -> TaskData:
        train, train_labels, test, test_labels = alphabet.split(self.split_seed)
        task = TaskData(
            alphabet.name,
            len(alphabet.characters),
            self._resize(alphabet.read(train)),
            torch.tensor(train_labels, dtype=torch.int64),
            self._resize(alphabet.read(test)),
            torch.tensor(test_labels, dtype=torch.int64),
        )
        task.validate(str(self.root / Omniglot.folder / alphabet.name))
        return task

    def _resize(self, images: Tensor) -> Tensor:
        if self.image_size == SIDE:
            return images
        return resize(images, [self.image_size, self.image_size], antialias=True)
