"""Reading a file a user named (a key, a certificate, a tokens file) with errors that say
which file it was and what is wrong with it, instead of an OSError's traceback."""

from __future__ import annotations

import os
from pathlib import Path

from featurebank.core.errors import InvalidInput, NotFound


def read_named_file(what: str, path: str | os.PathLike[str]) -> bytes:
    """The bytes of the file `what` (e.g. "--tls-key") names; NotFound or InvalidInput."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidInput(f"{what} {path} cannot be read: it is a folder, not a file") from None
    except OSError as e:
        raise InvalidInput(f"{what} {path} cannot be read: {e.strerror or e}") from None


def read_named_text(what: str, path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of the file `what` names; NotFound or InvalidInput."""
    try:
        return read_named_file(what, path).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} {path} is not UTF-8 text") from None
