"""Listing the image files of a folder tree, and reading one without ever hanging.

A folder a user points at may hold what no image loader expects: file names that are
not UTF-8, FIFOs and devices named like images, directory symlinks that loop back into
the tree. Listing keeps every image file exactly once under a key it can store, and
says what it skipped; reading opens without blocking and accepts only regular files.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Listing:
    """Image files found (key, absolute path), other files ignored, folders left out."""

    files: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0
    skipped: list[str] = field(default_factory=list)  # "folder (why)" of each one left out


def storable_key(rel: str) -> str:
    """A relative path as a key the store can hold (valid UTF-8).

    Names that are not valid UTF-8 come from the file system with their bytes
    smuggled in as surrogates; the key writes each such byte as `\\xNN` instead, so
    the file is embedded, and its key is the same on every run.
    """
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def list_images(root: Path, extensions: set[str], follow_links: bool = False) -> Listing:
    """Every file under `root` whose extension is in `extensions`, sorted by key.

    Hidden files and folders (a leading dot) are left out. Directory symlinks are not
    followed unless `follow_links`; even then a link to a folder already walked (a loop,
    or a second way into the same folder) is skipped, so no image is listed twice.
    Non-regular files named like images are listed: reading them fails with a reason.
    """
    out = Listing()
    top = os.fspath(root)
    st = os.stat(top)
    seen = {(st.st_dev, st.st_ino)}
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            _skip(out, _rel(folder, top), f"cannot list: {e.strerror or e}")
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                why = _not_walked(entry, seen, follow_links)
                if why is None:
                    subfolders.append(entry.path)
                else:
                    _skip(out, _rel(entry.path, top), why)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                out.files.append((storable_key(_rel(entry.path, top)), entry.path))
            else:
                out.ignored += 1
        stack.extend(sorted(subfolders, reverse=True))
    out.files.sort()
    return out


def _skip(out: Listing, rel: str, why: str) -> None:
    text = f"{storable_key(rel)}/ ({why})"
    out.skipped.append(text)
    log.warning("left out %s", text)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows a symlink to see what it points at
    except OSError:
        return False


def _not_walked(
    entry: os.DirEntry[str], seen: set[tuple[int, int]], follow_links: bool
) -> str | None:
    """Why a folder is not walked, or None to walk it (and remember it as walked)."""
    link = entry.is_symlink()
    if link and not follow_links:
        return f"directory symlink to {os.readlink(entry.path)} not followed (--follow-links)"
    try:
        st = entry.stat()  # follows a link
    except OSError as e:
        return f"cannot stat: {e.strerror or e}"
    if (st.st_dev, st.st_ino) in seen:
        target = f"symlink to {os.readlink(entry.path)}" if link else "folder"
        return f"{target} leads to a folder already walked (a loop)"
    seen.add((st.st_dev, st.st_ino))
    return None


def _rel(path: str, top: str) -> str:
    return Path(os.path.relpath(path, top)).as_posix()


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file; never blocks on a FIFO, a socket or a device.

    The file is opened non-blocking (opening a FIFO for reading otherwise waits for a
    writer) and refused unless it is a regular file; at most `max_bytes` are read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(_kind(st.st_mode))
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FileTooLarge(max(size, st.st_size), max_bytes)
    finally:
        os.close(fd)


class NotRegularFile(OSError):
    """A path that names a FIFO, socket, device or folder rather than a file."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"not a regular file ({kind})")
        self.kind = kind


class FileTooLarge(OSError):
    """A file over the size a reader accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"too large: the file has over {size} bytes, the limit is {limit}")
        self.size = size


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a file"
