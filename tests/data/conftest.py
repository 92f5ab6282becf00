"""Small fake datasets in each dataset's real on-disk format, and a local HTTP server.

Every fake image carries its example index in two pixels, so tests can check where an image
went. ``decode_id`` reads it back from a float image in [0, 1].
"""

from __future__ import annotations

import hashlib
import pickle
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lws_lightning.data.download import RemoteFile

# Fake DKL-MNIST sizes: training images per class, test images per class.
DKL_TRAIN_PER_CLASS = {"digits": 6, "letters": 4, "kmnist": 6}
DKL_TEST_PER_CLASS = {"digits": 2, "letters": 1, "kmnist": 1}
DKL_CLASSES = {"digits": 10, "letters": 26, "kmnist": 10}
# Planted in every raw EMNIST image at (row, column) of the file.
EMNIST_MARK = (2, 20)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dimensions)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())


def plant_ids(images: np.ndarray, first_id: int) -> np.ndarray:
    """Write ids ``first_id ..`` into pixels (0, 0) and (0, 1) of ``[N, H, W]`` images."""
    ids = np.arange(first_id, first_id + len(images))
    images[:, 0, 0] = ids % 256
    images[:, 0, 1] = ids // 256
    return images


def decode_id(image) -> int:
    """Read the id planted by :func:`plant_ids` from a ``[C, H, W]`` float image in [0, 1]."""
    pixels = (image[0] * 255).round().long()
    return int(pixels[0, 0]) + 256 * int(pixels[0, 1])


def balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


@dataclass
class FakeSplit:
    """Images and labels written to one fake file pair."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class FakeDkl:
    root: Path
    splits: dict[tuple[str, str], FakeSplit] = field(default_factory=dict)


def write_fake_dkl(root: Path, seed: int = 0) -> FakeDkl:
    """Write EMNIST digits and letters and KMNIST IDX files in torchvision's raw layout."""
    rng = np.random.default_rng(seed)
    fake = FakeDkl(root)
    next_id = 0
    for task in ("digits", "letters", "kmnist"):
        for part in ("train", "test"):
            per_class = (DKL_TRAIN_PER_CLASS if part == "train" else DKL_TEST_PER_CLASS)[task]
            labels = balanced_labels(DKL_CLASSES[task], per_class, rng)
            images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
            if task == "letters":
                labels = labels + 1  # torchvision's EMNIST letters are 1..26
            if task == "kmnist":
                plant_ids(images, next_id)
                folder, stem = root / "KMNIST" / "raw", "train" if part == "train" else "t10k"
            else:
                images[:, EMNIST_MARK[0], EMNIST_MARK[1]] = 255
                images[:, EMNIST_MARK[1], EMNIST_MARK[0]] = 0
                # Stored transposed, as in the real files: id pixels at (0, 0) and (1, 0).
                plant_ids(images.transpose(0, 2, 1), next_id)
                folder, stem = root / "EMNIST" / "raw", f"emnist-{task}-{part}"
            next_id += len(labels)
            write_idx(folder / f"{stem}-images-idx3-ubyte", images)
            write_idx(folder / f"{stem}-labels-idx1-ubyte", labels)
            fake.splits[(task, part)] = FakeSplit(images, labels)
    return fake


@pytest.fixture
def fake_dkl(tmp_path: Path) -> FakeDkl:
    return write_fake_dkl(tmp_path / "root")


@dataclass
class FakeCifar:
    root: Path
    coarse_of_fine: np.ndarray
    train: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)


def write_cifar_pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_fake_cifar(root: Path, train_per_fine: int = 2, test_per_fine: int = 1) -> FakeCifar:
    """Write ``cifar-100-python/{train,test,meta}`` with a shuffled fine-to-coarse mapping."""
    rng = np.random.default_rng(1)
    # A random grouping, so a hard-coded CIFAR-100 table would fail the tests.
    coarse_of_fine = rng.permutation(100) // 5
    fake = FakeCifar(root, coarse_of_fine)
    next_id = 0
    for part, per_fine in (("train", train_per_fine), ("test", test_per_fine)):
        fine = balanced_labels(100, per_fine, rng)
        data = rng.integers(0, 256, size=(len(fine), 3, 32, 32), dtype=np.uint8)
        plant_ids(data[:, 0], next_id)
        next_id += len(fine)
        content = {
            "filenames": [f"image_{i}.png" for i in range(len(fine))],
            "batch_label": f"{part} batch",
            "fine_labels": fine.tolist(),
            "coarse_labels": coarse_of_fine[fine].tolist(),
            "data": data.reshape(len(fine), -1),
        }
        write_cifar_pickle(root / "cifar-100-python" / part, content)
        setattr(fake, part, content)
    meta = {
        "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
    }
    write_cifar_pickle(root / "cifar-100-python" / "meta", meta)
    return fake


@pytest.fixture
def fake_cifar(tmp_path: Path) -> FakeCifar:
    return write_fake_cifar(tmp_path / "root")


# Fake Omniglot: alphabet -> number of characters, per image set.
OMNIGLOT_ALPHABETS = {
    "images_background": {"Anglo": 3, "Bengali": 2, "Cyrillic": 4},
    "images_evaluation": {"Dotted": 2, "Elvish": 3},
}
OMNIGLOT_IMAGES_PER_CHARACTER = 5


def write_fake_omniglot(root: Path) -> Path:
    """Write ``omniglot-py/<set>/<alphabet>/characterNN/*.png`` as 105×105 binary images."""
    rng = np.random.default_rng(2)
    for image_set, alphabets in OMNIGLOT_ALPHABETS.items():
        for alphabet, num_characters in alphabets.items():
            for character in range(1, num_characters + 1):
                folder = root / "omniglot-py" / image_set / alphabet / f"character{character:02d}"
                folder.mkdir(parents=True)
                for drawer in range(1, OMNIGLOT_IMAGES_PER_CHARACTER + 1):
                    pixels = rng.random((105, 105)) < 0.5
                    image = Image.fromarray(pixels.astype(np.uint8) * 255).convert("1")
                    image.save(folder / f"{character:04d}_{drawer:02d}.png")
    return root


@pytest.fixture
def fake_omniglot(tmp_path: Path) -> Path:
    return write_fake_omniglot(tmp_path / "root")


class _Handler(SimpleHTTPRequestHandler):
    """Handler that serves a folder. Paths under /cut/ announce the full size but send half."""

    def do_GET(self) -> None:  # noqa: N802 (name fixed by http.server)
        if not self.path.startswith("/cut/"):
            super().do_GET()
            return
        body = (Path(self.directory) / self.path.removeprefix("/cut/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature fixed)
        pass


@dataclass
class LocalServer:
    folder: Path
    url: str

    def remote(self, name: str, content: bytes | None = None, path: str | None = None):
        """Describe a served file with the MD5 of ``content``, by default of the file itself."""
        data = (self.folder / name).read_bytes() if content is None else content
        return RemoteFile(name, (f"{self.url}/{path or name}",), hashlib.md5(data).hexdigest())


@pytest.fixture
def http_server(tmp_path: Path):
    """Serve ``tmp_path/served`` over HTTP on 127.0.0.1 until the test ends."""
    folder = tmp_path / "served"
    folder.mkdir()

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(folder), **kwargs)

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield LocalServer(folder, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """URL of a local port that nothing listens on, so connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
