"""Checksums of published files, so a damaged generation is named and never served.

Every generation folder (indexes/<gen>/, heads/<gen>/) gets a `checksums.json` sidecar,
written by `core.bank.publish` before the folder is renamed into place: the size and
sha256 of each file. Loading checks sizes (a stat per file, so it is cheap enough for every
open); `featurebank store verify` also checks the hashes. A folder published before
sidecars existed has none and is checked only for its files being readable.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from featurebank.core.errors import DamagedFile

CHECKSUMS = "checksums.json"
STAGING = "staging"  # BANK/staging: shards of `embed --engine ray` before they are committed
SHARD_FILE, SHARD_MARKER = ".parquet", ".done"  # shard-<id>.parquet, vouched for by shard-<id>.done
_CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record every regular file of `directory` (not yet published) in its sidecar."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != CHECKSUMS
    }
    (directory / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def read_checksums(directory: Path) -> dict[str, dict[str, Any]] | None:
    """The recorded files of a generation; None for one published before sidecars."""
    path = directory / CHECKSUMS
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a map")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedFile(f"{path} is damaged ({e})") from None
    return files


def problems(directory: Path, deep: bool = False) -> list[str]:
    """What is wrong with one generation folder, one line per damaged file ([] if intact)."""
    if not directory.is_dir():
        return [f"{directory} is missing"]
    try:
        files = read_checksums(directory)
    except DamagedFile as e:
        return [str(e)]
    if files is None:
        return []
    found = []
    for name, want in files.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            found.append(f"{path} is missing")
            continue
        if size != want.get("size"):
            found.append(f"{path} is damaged ({size} bytes, {want.get('size')} published)")
        elif deep and sha256_of(path) != want.get("sha256"):
            found.append(f"{path} is damaged (its content no longer matches its checksum)")
    return found


def require_intact(directory: Path, deep: bool = False) -> None:
    """Raise DamagedFile naming the first damaged file of a generation folder."""
    found = problems(directory, deep)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise DamagedFile(found[0] + more)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object the bank wrote (a manifest), or DamagedFile naming it."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedFile(f"{path} is missing ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DamagedFile(f"{path} is damaged ({what}: {e})") from None
    if not isinstance(value, dict):
        raise DamagedFile(f"{path} is damaged ({what} is not a JSON object)")
    return value


def marked_file_problems(marker: Path, data: Path, deep: bool = False) -> list[str]:
    """What is wrong with a file and the JSON marker that records its size ("bytes") and
    sha256 (how a finished embedding shard vouches for its Parquet file); [] if intact."""
    try:
        record = json.loads(marker.read_text())
        size, digest = int(record["bytes"]), str(record["sha256"])
    except FileNotFoundError:
        return [f"{marker} is missing"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return [f"{marker} is damaged ({type(e).__name__}: {e})"]
    try:
        found = data.stat().st_size
    except FileNotFoundError:
        return [f"{data} is missing (its marker {marker.name} says it was written)"]
    if found != size:
        return [f"{data} is damaged ({found} bytes, {size} written)"]
    if deep and sha256_of(data) != digest:
        return [f"{data} is damaged (its content no longer matches its checksum)"]
    return []


def shard_problems(staging: Path, deep: bool = False) -> dict[str, str]:
    """shard id -> what is wrong, for each finished shard in a staging folder whose done
    marker or Parquet file is damaged or missing (`deep`: content hashes too)."""
    found = {}
    for marker in sorted(staging.glob(f"shard-*{SHARD_MARKER}")):
        sid = marker.name[len("shard-") : -len(SHARD_MARKER)]
        lines = marked_file_problems(marker, marker.with_name(f"shard-{sid}{SHARD_FILE}"), deep)
        if lines:
            found[sid] = lines[0]
    return found
