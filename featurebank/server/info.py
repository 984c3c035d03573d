"""What the server tells about its bank: GetInfo, Suggest, Audit and GetReport.

Suggest and Audit answer with the generations they were computed on, so a labelling
tool can tell whether the labels moved since.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurebank.core.errors import NotFound
from featurebank.index.filters import Node
from featurebank.server.batching import run_in
from featurebank.server.live import Live
from featurebank.server.status import redacted


@dataclass(frozen=True)
class Labelling:
    """Suggestions or audit findings, with the generations they were computed on."""

    items: list[Any]
    index_generation: int
    labels_generation: int


class Info:
    """The read-only views of the live bank, run on the `compute` executor.

    `device_report` says where images are embedded; `extra`, when set, adds entries to
    the bank's info (a read replica adds how far behind it is).
    """

    def __init__(
        self,
        live: Live,
        compute: ThreadPoolExecutor,
        device_report: Callable[[], dict[str, Any]],
    ) -> None:
        self.live = live
        self.compute = compute
        self.device_report = device_report
        self.extra: Callable[[], dict[str, Any]] | None = None
        self.repair_state: Callable[[], str | None] = lambda: None  # the engine's, once set

    async def bank(self) -> dict[str, Any]:
        """Counts, labels, the live index and head, and the embedding device (GetInfo)."""
        return await run_in(self.compute, self._bank)

    def _bank(self) -> dict[str, Any]:
        store = self.live.opened()
        m = self.live.models
        _, codes, vocab = store.label_table()
        info: dict[str, Any] = {
            "bank": str(self.live.bank.root),
            "spec": store.spec,
            "count": int(store.count),
            "labelled": int(np.count_nonzero(np.asarray(codes) >= 0)),
            "store_generation": int(store.generation),
            "labels_generation": int(store.labels_generation),
            "labels": list(vocab),
            "index": {},
            "head": {},
            "default_mode": None,
            "device": self.device_report(),
            "damaged": {"index": "", "head": ""},
        }
        if m is not None:
            keeper = self.live.keeper
            info["index"] = {
                "generation": int(m.classifier.index_generation),
                "ntotal": int(m.searcher.ntotal),
                "manifest": dict(m.searcher.manifest),
                "pending_items": int(m.searcher.segment.size + m.searcher.stale_count),
                "checkpoint_error": keeper.checkpointer.last_error if keeper else None,
            }
            info["default_mode"] = str(m.classifier.default_mode)
            head = m.classifier.head
            if head is not None:
                info["head"] = {
                    "generation": int(head.generation),
                    "stale": bool(m.classifier.head_stale),
                    "manifest": dict(head.manifest),
                }
            repair = self.repair_state()
            for what, found in (("index", m.classifier.index_damaged),
                                ("head", m.classifier.head_damaged)):  # fmt: skip
                if found:
                    info["damaged"][what] = redacted(f"{found} ({repair or 'run `featurebank store repair`'})")
        if self.extra is not None:
            info.update(self.extra())
        return info

    async def suggest(
        self, n: int, strategy: str, label: str | None, where: Node | None = None
    ) -> Labelling:
        return await run_in(self.compute, self._suggest, n, strategy, label, where)

    def _suggest(self, n: int, strategy: str, label: str | None, where: Node | None) -> Labelling:
        from featurebank.classify.suggest import suggest

        clf = self.live.current().classifier
        labels_gen = int(self.live.opened().labels_generation)
        out = suggest(clf, n=n, strategy=strategy, label=label, where=where)
        return Labelling(out, int(clf.index_generation), labels_gen)

    async def audit(self, n: int, where: Node | None = None) -> Labelling:
        return await run_in(self.compute, self._audit, n, where)

    def _audit(self, n: int, where: Node | None) -> Labelling:
        from featurebank.classify.audit import audit

        clf = self.live.current().classifier
        labels_gen = int(self.live.opened().labels_generation)
        return Labelling(audit(clf, n=n, where=where), int(clf.index_generation), labels_gen)

    async def report(self) -> dict[str, Any]:
        return await run_in(self.compute, self._report)

    def _report(self) -> dict[str, Any]:
        from featurebank.classify.report import latest_report

        reports = self.live.bank.reports_dir
        found = latest_report(reports)
        if found is None:
            raise NotFound(f"no evaluation report in {reports}: run `featurebank eval` first")
        return found
