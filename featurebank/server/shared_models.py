"""One loaded model per backbone, shared by every open bank whose spec names it.

Why: banks made with the same backbone and weights (one per project, a staging copy
beside production) embed images identically; loading the model once per bank would
multiply the largest thing a server holds. Banks share the model and the one thread
that runs it (Keras models are not called from two threads at once); the model is
dropped when the last bank using it closes.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featurebank.core.spec import Spec
    from featurebank.embedder.devices import Placement
    from featurebank.embedder.embedding import Embedder


@dataclass
class SharedModel:
    embedder: Embedder
    executor: ThreadPoolExecutor  # the one thread that runs this model
    users: int = 0


class ModelPool:
    """Spec identity and placement -> the one Embedder (and its thread) banks share."""

    def __init__(self) -> None:
        self._models: dict[str, SharedModel] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(spec: Spec, placement: Placement) -> str:
        return json.dumps([spec.identity(), placement.to_dict()], sort_keys=True)

    def take(self, spec: Spec, placement: Placement) -> SharedModel:
        """The shared model for `spec` (built on first use); `give_back` when done."""
        from featurebank.embedder.embedding import Embedder

        key = self.key(spec, placement)
        with self._lock:  # building under the lock: two banks never build the same model twice
            shared = self._models.get(key)
            if shared is None:
                shared = SharedModel(
                    Embedder.from_spec(spec, placement=placement),
                    ThreadPoolExecutor(1, thread_name_prefix="fb-embed-shared"),
                )
                self._models[key] = shared
            shared.users += 1
            return shared

    def give_back(self, shared: SharedModel) -> None:
        """One bank is done with the model; the last one frees it."""
        with self._lock:
            shared.users -= 1
            if shared.users > 0:
                return
            for key, found in list(self._models.items()):
                if found is shared:
                    del self._models[key]
        shared.executor.shutdown(wait=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)
