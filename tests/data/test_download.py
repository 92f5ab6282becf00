"""Downloads from a local HTTP server and file:// URLs: good, truncated and refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from lws_lightning.data import (
    Cifar100TasksDataModule,
    DklMnistDataModule,
    MnistTrioDataModule,
    OmniglotAlphabetsDataModule,
    cifar100,
    dkl_mnist,
    mnist_trio,
    omniglot,
)
from lws_lightning.data.download import RemoteFile, fetch, gunzip, staging_folder
from lws_lightning.errors import CorruptDataError, DataNotFoundError

from .conftest import write_fake_cifar, write_fake_dkl, write_fake_omniglot

PAYLOAD = bytes(range(256)) * 64


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def test_fetch_good_file(http_server, tmp_path):
    (http_server.folder / "good.bin").write_bytes(PAYLOAD)
    target = tmp_path / "target"
    target.mkdir()
    path = fetch(http_server.remote("good.bin"), target, "fake")
    assert path.read_bytes() == PAYLOAD


def test_fetch_file_url(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    target = tmp_path / "target"
    target.mkdir()
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    path = fetch(RemoteFile("copy.bin", (source.as_uri(),), md5), target, "fake")
    assert path.read_bytes() == PAYLOAD


def test_fetch_truncated_file(http_server, tmp_path):
    # The server has a truncated copy, so the transfer completes but the MD5 differs.
    (http_server.folder / "short.bin").write_bytes(PAYLOAD[:1000])
    remote = http_server.remote("short.bin", content=PAYLOAD)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(CorruptDataError, match="short.bin.*MD5"):
        fetch(remote, target, "fake")
    assert leftovers(target) == []


def test_fetch_connection_cut(http_server, tmp_path):
    (http_server.folder / "good.bin").write_bytes(PAYLOAD)
    remote = http_server.remote("good.bin", path="cut/good.bin")
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(DataNotFoundError, match="good.bin"):
        fetch(remote, target, "fake")
    assert leftovers(target) == []


def test_fetch_refused(closed_port_url, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    remote = RemoteFile("x.bin", (f"{closed_port_url}/x.bin",), None)
    with pytest.raises(DataNotFoundError, match="refused") as error:
        fetch(remote, target, "fake")
    assert closed_port_url in str(error.value)
    assert leftovers(target) == []


def test_fetch_tries_next_mirror(http_server, closed_port_url, tmp_path):
    (http_server.folder / "good.bin").write_bytes(PAYLOAD)
    good = http_server.remote("good.bin")
    remote = RemoteFile("good.bin", (f"{closed_port_url}/good.bin", *good.urls), good.md5)
    target = tmp_path / "target"
    target.mkdir()
    assert fetch(remote, target, "fake").read_bytes() == PAYLOAD


def test_staging_folder_removed_after_error(tmp_path):
    with pytest.raises(RuntimeError), staging_folder(tmp_path, "fake") as staging:
        (staging / "partial").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert leftovers(tmp_path) == []


def test_gunzip_truncated(tmp_path):
    source = tmp_path / "file.gz"
    source.write_bytes(gzip.compress(PAYLOAD)[:100])
    target = tmp_path / "out" / "file"
    with pytest.raises(CorruptDataError, match="file.gz"):
        gunzip(source, target)
    assert leftovers(tmp_path / "out") == []


# End to end: KMNIST through DklMnistDataModule.prepare_data().


def serve_kmnist(http_server, tmp_path, monkeypatch, cut: str | None = None) -> None:
    """Gzip fake KMNIST files into the served folder and point the download list at them."""
    fake = write_fake_dkl(tmp_path / "source")
    remotes = []
    for raw in sorted((fake.root / "KMNIST" / "raw").iterdir()):
        name = f"{raw.name}.gz"
        (http_server.folder / name).write_bytes(gzip.compress(raw.read_bytes()))
        path = f"cut/{name}" if name == cut else name
        remotes.append(http_server.remote(name, path=path))
    monkeypatch.setattr(dkl_mnist, "kmnist_remotes", lambda: remotes)


def root_with_emnist(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    fake = write_fake_dkl(tmp_path / "emnist_source")
    shutil.copytree(fake.root / "EMNIST", root / "EMNIST")
    return root


def test_kmnist_download_end_to_end(http_server, tmp_path, monkeypatch):
    serve_kmnist(http_server, tmp_path, monkeypatch)
    root = root_with_emnist(tmp_path)
    datamodule = DklMnistDataModule(str(root), download=True, train_per_task=30)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.num_classes == [10, 26, 10]
    assert sorted(path.name for path in root.iterdir()) == ["EMNIST", "KMNIST"]


def test_failed_download_then_retry(http_server, tmp_path, monkeypatch):
    serve_kmnist(http_server, tmp_path, monkeypatch, cut="t10k-labels-idx1-ubyte.gz")
    root = root_with_emnist(tmp_path)
    datamodule = DklMnistDataModule(str(root), download=True, train_per_task=30)
    with pytest.raises(DataNotFoundError, match="KMNIST.*t10k-labels-idx1-ubyte.gz"):
        datamodule.prepare_data()
    assert sorted(path.name for path in root.iterdir()) == ["EMNIST"]

    serve_kmnist(http_server, tmp_path / "retry", monkeypatch)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.num_tasks == 3


def test_refused_download_leaves_nothing(closed_port_url, tmp_path, monkeypatch):
    remotes = [RemoteFile("train-images-idx3-ubyte.gz", (f"{closed_port_url}/x.gz",), None)]
    monkeypatch.setattr(dkl_mnist, "kmnist_remotes", lambda: remotes)
    root = root_with_emnist(tmp_path)
    with pytest.raises(DataNotFoundError, match="refused"):
        DklMnistDataModule(str(root), download=True).prepare_data()
    assert sorted(path.name for path in root.iterdir()) == ["EMNIST"]


def test_emnist_archive_download(http_server, tmp_path, monkeypatch):
    fake = write_fake_dkl(tmp_path / "source")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as members:
        for raw in sorted((fake.root / "EMNIST" / "raw").iterdir()):
            members.writestr(f"gzip/{raw.name}.gz", gzip.compress(raw.read_bytes()))
    (http_server.folder / "gzip.zip").write_bytes(archive.getvalue())
    monkeypatch.setattr(dkl_mnist, "emnist_remote", lambda: http_server.remote("gzip.zip"))
    root = tmp_path / "root"
    shutil.copytree(fake.root / "KMNIST", root / "KMNIST")
    datamodule = DklMnistDataModule(str(root), download=True, train_per_task=30)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.num_classes == [10, 26, 10]
    assert sorted(path.name for path in root.iterdir()) == ["EMNIST", "KMNIST"]


def test_cifar_archive_download(http_server, tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "source")
    archive = http_server.folder / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "source" / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(
        cifar100, "cifar100_remote", lambda: http_server.remote("cifar-100-python.tar.gz")
    )
    root = tmp_path / "root"
    root.mkdir()
    datamodule = Cifar100TasksDataModule(str(root), download=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.num_tasks == 20
    assert [path.name for path in root.iterdir()] == ["cifar-100-python"]


def test_omniglot_archive_download(http_server, tmp_path, monkeypatch):
    source = write_fake_omniglot(tmp_path / "source") / "omniglot-py"
    remotes = []
    for name in ("images_background", "images_evaluation"):
        shutil.make_archive(str(http_server.folder / name), "zip", source, name)
        remotes.append(http_server.remote(f"{name}.zip"))
    monkeypatch.setattr(omniglot, "omniglot_remotes", lambda: remotes)
    root = tmp_path / "root"
    root.mkdir()
    datamodule = OmniglotAlphabetsDataModule(str(root), download=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.num_tasks == 5
    assert sorted(path.name for path in (root / "omniglot-py").iterdir()) == [
        "images_background",
        "images_evaluation",
    ]


def test_fashion_download_when_source_missing(http_server, tmp_path, monkeypatch):
    fake = write_fake_dkl(tmp_path / "source")
    remotes = []
    for raw in sorted((fake.root / "KMNIST" / "raw").iterdir()):
        (http_server.folder / f"{raw.name}.gz").write_bytes(gzip.compress(raw.read_bytes()))
        remotes.append(http_server.remote(f"{raw.name}.gz"))
    monkeypatch.setattr(mnist_trio, "remote_gz_files", lambda dataset_class: remotes)
    root = tmp_path / "root"
    root.mkdir()
    datamodule = MnistTrioDataModule(
        str(root), download=True, fashion_source=str(tmp_path / "no_source")
    )
    datamodule.prepare_data()
    installed = sorted(path.name for path in (root / "FashionMNIST" / "raw").iterdir())
    assert installed == sorted(path.name for path in (fake.root / "KMNIST" / "raw").iterdir())
