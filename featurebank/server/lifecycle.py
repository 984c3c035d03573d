"""CreateBank, DropBank and SetAlias: banks made and removed under `--banks DIR` while serving.

Why on the server: a new bank can be built and swapped in (SetAlias prod -> the new one)
without a shell on the server's machine or a restart; each step is all or nothing (a
bank exists with its store or not at all, an alias points to one bank at any moment).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path

from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.spec import Spec
from featurebank.server.banks import Banks, Entry, check_name
from featurebank.server.following import followed
from featurebank.v1 import featurebank_pb2 as pb

log = logging.getLogger(__name__)

EXTERNAL_BACKBONES = ("", "external")  # a spec naming no backbone: vectors made elsewhere


def spec_of(given: pb.Spec) -> Spec:
    """The Spec a CreateBank asks for (blocking: a backbone's model is built to know its dim)."""
    if given.backbone in EXTERNAL_BACKBONES:
        if given.dim <= 0:
            raise InvalidInput("CreateBank: spec.dim must be positive for a bank of imported vectors")
        return Spec.external("external", int(given.dim), given.dtype or "float32")
    from featurebank.embedder.embedding import Embedder, make_spec

    size = (int(given.input_height), int(given.input_width)) if given.input_height else None
    wanted = make_spec(
        given.backbone, weights=given.weights or "imagenet", layer=given.layer or None,
        image_size=size, resize=given.resize or "crop", pooling=given.pooling or "avg",
        dtype=given.dtype or "float16", preprocessing=given.preprocessing or None,
    )
    spec = Embedder.from_spec(wanted).spec
    if given.dim and given.dim != spec.dim:
        raise InvalidInput(f"CreateBank: spec.dim is {given.dim} but {given.backbone} makes {spec.dim}")
    return spec


class Lifecycle:
    """The three lifecycle calls over the server's banks."""

    def __init__(self, banks: Banks) -> None:
        self.banks = banks
        self._creating: set[str] = set()

    async def create(self, name: str, given: pb.Spec) -> Entry:
        check_name(name)
        root = self.banks.lifecycle_root("CreateBank")
        if name in self.banks.entries or name in self.banks.aliases or name in self._creating:
            raise FailedPrecondition(f"bank {name!r} already exists on this server")
        folder = root / name
        if folder.exists():
            raise FailedPrecondition(f"bank {name!r}: a folder of that name is already there")
        self._creating.add(name)
        try:
            await asyncio.get_running_loop().run_in_executor(None, _create, folder, given)
            entry = self.banks.add(name, folder)
        finally:
            self._creating.discard(name)
        log.info("bank %s created", name)
        return entry

    async def drop(self, name: str, force: bool) -> None:
        root = self.banks.lifecycle_root("DropBank")
        entry = self.banks.entries.get(name)
        if entry is None:
            self.banks.resolve(check_name(name))  # NOT_FOUND naming it (or the alias it is)
            raise FailedPrecondition(f"{name!r} is an alias: remove it with SetAlias, not DropBank")
        if entry.path.resolve().parent != root.resolve():
            raise FailedPrecondition(
                f"bank {name!r} is served from outside --banks: DropBank removes only banks under it"
            )
        loop = asyncio.get_running_loop()
        is_followed = followed(entry.path)
        if is_followed and not force:
            raise FailedPrecondition(
                f"bank {name!r} is followed by read replicas: stop them first, or drop with force"
            )
        await self.banks.remove(name)
        await loop.run_in_executor(None, _remove_folder, entry.path)
        log.info("bank %s dropped%s", name, " (replicas still followed it)" if is_followed else "")

    def set_alias(self, alias: str, bank: str) -> str:
        if bank:
            check_name(bank)
        return self.banks.set_alias(alias, bank)


def _create(folder: Path, given: pb.Spec) -> None:
    from featurebank import store as store_mod

    spec = spec_of(given)
    staging = folder.with_name(f".creating-{folder.name}-{os.getpid()}")
    try:
        store_mod.create(staging, spec).close()
        os.rename(staging, folder)  # the bank appears whole, or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_folder(folder: Path) -> None:
    """Move the bank aside in one rename (no half-deleted bank is ever served), then delete it."""
    trash = folder.with_name(f".dropped-{folder.name}-{time.time_ns()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
