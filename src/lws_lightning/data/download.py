"""Download and unpack dataset files without leaving partial files under the data root.

Everything is written into a staging folder inside the data root first. Files move to their
final place only after every download of the dataset succeeded and passed its MD5 check. The
staging folder is removed whether the download succeeded or failed, so a retry starts clean.
URLs and MD5 sums come from torchvision's dataset classes.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from lws_lightning.errors import CorruptDataError, DataNotFoundError

log = logging.getLogger(__name__)

# Seconds that one connection attempt or one read may block before the download fails.
TIMEOUT_S = 60.0
STAGING_PREFIX = ".staging-"
_CHUNK_BYTES = 1 << 20
_USER_AGENT = "lws-lightning"


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: its name on disk, mirror URLs tried in order, and MD5 sum."""

    name: str
    urls: tuple[str, ...]
    md5: str | None = None


def fetch(remote: RemoteFile, folder: Path, dataset: str, timeout: float = TIMEOUT_S) -> Path:
    """Download ``remote`` into ``folder``, trying each mirror until one passes the MD5 check.

    Args:
        remote: The file to download.
        folder: Destination folder, normally a staging folder.
        dataset: Dataset name used in messages.
        timeout: Seconds one connection attempt or read may block.

    Returns:
        Path of the downloaded file.

    Raises:
        DataNotFoundError: Every mirror failed to connect or stopped mid-transfer.
        CorruptDataError: A transfer completed, but no file passed the MD5 check.
    """
    target = folder / remote.name
    failures: list[str] = []
    checksum_failed = False
    for url in remote.urls:
        log.info("Downloading %s", url)
        try:
            md5 = _download(url, target, timeout)
        except (urllib.error.URLError, HTTPException, OSError) as error:
            log.warning("Download of %s failed: %s", url, error)
            failures.append(f"{url}: {error}")
            target.unlink(missing_ok=True)
            continue
        if remote.md5 is not None and md5 != remote.md5:
            log.warning("Download of %s has MD5 %s, expected %s", url, md5, remote.md5)
            failures.append(f"{url}: MD5 {md5}, expected {remote.md5}")
            checksum_failed = True
            target.unlink(missing_ok=True)
            continue
        return target

    tried = "; ".join(failures)
    if checksum_failed:
        raise CorruptDataError(
            f"Downloading {dataset} file {remote.name} gave a truncated or changed file ({tried}). "
            "Nothing was written to the data root. Retry later, or place a verified copy of the "
            "file there by hand."
        )
    raise DataNotFoundError(
        f"Downloading {dataset} file {remote.name} failed ({tried}). Nothing was written to "
        "the data root. Check the network connection and retry, or copy the dataset files "
        "into the data root by hand and set download=false."
    )


def _download(url: str, target: Path, timeout: float) -> str:
    """Stream ``url`` into ``target`` and return the MD5 hex digest of the bytes written."""
    md5 = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response, target.open("wb") as out:
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read(_CHUNK_BYTES):
            out.write(chunk)
            md5.update(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise OSError(f"connection closed after {received} of {expected} bytes")
    return md5.hexdigest()


@contextmanager
def staging_folder(root: Path, dataset: str) -> Iterator[Path]:
    """Yield a new empty folder inside ``root`` and remove it on exit, also after an error."""
    stale = sorted(root.glob(f"{STAGING_PREFIX}{dataset}-*"))
    if stale:
        # A process killed mid-download leaves its folder behind, and loading never reads it.
        log.warning(
            "Ignoring staging folders left by an interrupted download: %s. Delete them unless "
            "another download is running.",
            ", ".join(str(path) for path in stale),
        )
    folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{dataset}-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def gunzip(source: Path, target: Path) -> None:
    """Decompress ``source`` into ``target`` through a temporary file in ``target``'s folder.

    Raises:
        CorruptDataError: ``source`` is truncated or not a gzip file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out, gzip.open(source, "rb") as compressed:
            shutil.copyfileobj(compressed, out, _CHUNK_BYTES)
        # mkstemp makes the file readable by its owner only, so give it the usual mode instead.
        os.chmod(temporary, _file_mode())
        os.replace(temporary, target)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise CorruptDataError(
            f"Cannot decompress {source}: {error}. The file is truncated or not gzip data. "
            "Replace it with a complete copy."
        ) from error
    finally:
        # Still present only when something failed before the rename.
        Path(temporary).unlink(missing_ok=True)


def _file_mode() -> int:
    """Return the mode that ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def move_into(staged: Path, destination: Path) -> None:
    """Move every file under ``staged`` to the same relative path under ``destination``.

    Files that already exist at the destination are kept. Each move is an atomic rename, since
    the staging folder lies on the same file system as the destination.
    """
    for path in sorted(staged.rglob("*")):
        if path.is_dir():
            continue
        target = destination / path.relative_to(staged)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
