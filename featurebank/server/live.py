"""The bank as reads, writes and info see it while it is served: its open store and models.

Why its own object: the engine opens the store and swaps the models; reads, writes and
info only ask the few questions below (is the bank open, which models answer now, which
index generation is live), so none of them needs the engine itself.

Models are swapped, never mutated while in use: a read takes the current `Models` once,
so a rebuild that publishes a new generation changes what the next request sees, not
the one in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from featurebank.core.bank import Bank
from featurebank.core.errors import FailedPrecondition

if TYPE_CHECKING:
    from featurebank.classify.classifier import Classifier
    from featurebank.embedder.embedding import Embedder
    from featurebank.index.searcher import Searcher
    from featurebank.server.indexing import IndexKeeper
    from featurebank.server.metrics import Metrics
    from featurebank.store import Store


@dataclass(frozen=True)
class Models:
    """One consistent set of serving models; replaced as a whole on reload."""

    classifier: Classifier
    searcher: Searcher


class Live:
    """The served bank's state; the engine sets it, everything else reads it."""

    def __init__(self, bank: Bank, metrics: Metrics | None) -> None:
        self.bank = bank
        self.metrics = metrics
        self.store: Store | None = None
        self.embedder: Embedder | None = None
        self.models: Models | None = None
        self.load_error: str | None = None  # why no models are loaded
        self.keeper: IndexKeeper | None = None

    @property
    def is_open(self) -> bool:
        """The store is open: calls can be answered (maybe with FAILED_PRECONDITION)."""
        return self.store is not None

    def opened(self) -> Store:
        """The open store; FailedPrecondition while the bank is not open."""
        if self.store is None:
            raise FailedPrecondition(f"the bank {self.bank.root} is not open")
        return self.store

    def current(self) -> Models:
        """The models answering now; FailedPrecondition while there are none."""
        m = self.models
        if m is None:
            raise FailedPrecondition(
                self.load_error or f"no index yet in {self.bank.root}: run RebuildIndex first"
            )
        return m

    def searcher(self) -> Searcher | None:
        m = self.models
        return m.searcher if m is not None else None

    def index_generation(self) -> int:
        """The live index generation (0: none loaded)."""
        m = self.models
        return int(m.classifier.index_generation) if m else 0

    def head_generation(self) -> int:
        """The live head generation (0: none)."""
        m = self.models
        return int(m.classifier.head_generation or 0) if m else 0

    def catch_up(self) -> None:
        """Make what the store committed searchable (no index file is written)."""
        searcher = self.searcher()
        if searcher is not None:
            searcher.catch_up()
        self.update_gauges()

    def update_gauges(self) -> None:
        if self.metrics is None or self.store is None:
            return
        m = self.models
        self.metrics.set_sizes(
            bank_items=int(self.store.count),
            index_items=int(m.searcher.ntotal) if m else 0,
            store_generation=int(self.store.generation),
            index_generation=self.index_generation(),
            head_generation=m.classifier.head_generation if m else None,
        )
