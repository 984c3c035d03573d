"""A bank opened in this process: its store, its live index and head, its model.

The model (TensorFlow) is built the first time an image is embedded, the classifier the
first time something is searched or classified; every read first catches up with what
was committed and published since (by this process or another), as a server does.

Over 400 lines because it is one class answering the whole API (reads, writes, queries)
over one set of lazily built parts; split, each half would reach into the other's state.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank import store as store_mod
from featurebank.api.base import FeatureBank
from featurebank.api.inputs import IMAGES, KEYS, Query, check_dim
from featurebank.api.results import (
    Classification,
    Duplicate,
    Finding,
    Hits,
    Info,
    Item,
    Kept,
    Leak,
    Neighbor,
    Outlier,
    Page,
    Published,
    Quality,
    SplitCheck,
    Suggestion,
    Written,
)
from featurebank.core.bank import current_generation
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound, shown
from featurebank.core.spec import Spec
from featurebank.store.metadata import check_user_meta

if TYPE_CHECKING:
    from featurebank.api.serving import Served
    from featurebank.classify.audit import Finding as AuditFinding
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.quality import Cache, Report
    from featurebank.server.queries import Tables


class LocalBank(FeatureBank):
    """A bank in this process (`featurebank.create` / `featurebank.open`): see FeatureBank."""

    def __init__(self, store: store_mod.Store, embedder: Any = None) -> None:
        self.store = store
        self.path = store.bank.root
        self._embedder = embedder
        self._classifier: Classifier | None = None
        self._served: Served | None = None
        self._filter_tables: Tables | None = None
        self._quality_cache: Cache | None = None  # the last pass, so the next applies only changes

    def __repr__(self) -> str:
        return f"LocalBank({str(self.path)!r}, {self.store.spec.describe()!r})"

    # ------------------------------------------------------------------ parts

    @property
    def spec(self) -> Spec:
        """What the bank's vectors mean (backbone, weights, input size, dim, ...)."""
        return self.store.spec

    def _model(self) -> Any:
        if self._embedder is None:
            if not self.spec.has_model:
                raise FailedPrecondition(
                    f"bank {self.path} holds vectors made elsewhere ({self.spec.describe()}) "
                    "and has no model to embed images: pass vectors or featurebank.keys(...)"
                )
            from featurebank.embedder.embedding import Embedder

            self._embedder = Embedder.from_spec(self.spec)
        return self._embedder

    def _live(self) -> Classifier:
        """The classifier at the bank's live generations, caught up with the store."""
        from featurebank.classify.classifier import Classifier

        clf = self._classifier
        if clf is None:
            clf = self._classifier = Classifier(self.store)
        elif (clf.index_generation, clf.head_generation) != (
            current_generation(self.store.bank.indexes_dir),
            current_generation(self.store.bank.heads_dir),
        ):
            clf.reload()
        clf.searcher.catch_up()
        return clf

    # ------------------------------------------------------------------ reads

    def _embed(self, q: Query) -> np.ndarray:
        if q.kind == KEYS:
            return np.asarray(self.store.get_by_keys(q.keys).vectors, dtype=np.float32)
        if q.kind == IMAGES:
            model = self._model()
            return np.asarray(model.embed_arrays(self._pixels(model, q)), dtype=np.float32)
        assert q.vectors is not None
        check_dim(q.vectors, int(self.spec.dim))
        return q.vectors

    @staticmethod
    def _pixels(model: Any, q: Query) -> list[np.ndarray]:
        """Decode files at the model's input size exactly as the server does; name a bad one."""
        from featurebank.embedder.images import ImageError

        out = []
        for i, (item, name) in enumerate(zip(q.images, q.names, strict=True)):
            if isinstance(item, bytes):
                try:
                    item = model.prepare(item)
                except ImageError as e:
                    raise InvalidInput(f"{name or f'x[{i}]'}: {e.reason}") from None
            out.append(item)
        return out

    def _query(self, q: Query) -> tuple[np.ndarray, np.ndarray | None]:
        """Vectors of the inputs, and the ids of stored items given by key (left out of their
        own neighbours)."""
        if q.kind == KEYS:
            items = self.store.get_by_keys(q.keys)
            return np.asarray(items.vectors, np.float32), np.asarray(items.ids, np.int64)
        return self._embed(q), None

    def _search(
        self, q: Query, k: int, labels: list[str] | None, options: dict[str, Any]
    ) -> list[Hits]:
        from featurebank.server.queries import check_filter
        from featurebank.server.reads import SearchJob, search_jobs

        clf = self._live()
        vectors, exclude = self._query(q)
        where = check_filter(options["filter"])
        jobs = [
            SearchJob(v, k, tuple(labels or ()), None if exclude is None else int(exclude[i]),
                      options["include_metadata"], where, options["score_threshold"],
                      options["group_by"], options["group_size"])
            for i, v in enumerate(vectors)
        ]
        generation = int(clf.index_generation)
        return [Hits([_neighbor(h) for h in hits], generation)
                for hits in search_jobs(clf.searcher, self.store, jobs)]

    def _recommend(self, pos: Query, neg: Query | None, options: dict[str, Any]) -> Hits:
        from featurebank.server.queries import check_filter, recommend

        clf = self._live()
        p, p_ids = self._query(pos)
        n, n_ids = self._query(neg) if neg is not None else (np.zeros((0, p.shape[1]), np.float32), None)
        own = [int(i) for ids in (p_ids, n_ids) if ids is not None for i in ids]
        hits = recommend(clf.searcher, self.store, p, n, own, options["strategy"], options["k"],
                         check_filter(options["filter"]), options["score_threshold"],
                         options["include_metadata"])
        return Hits([_neighbor(h) for h in hits], int(clf.index_generation))

    def _scroll(self, filter_text: str, limit: int, token: str, vectors: bool) -> Page:
        from featurebank.server import queries

        if limit > queries.MAX_SCROLL_LIMIT:
            raise InvalidInput(f"limit={limit} is out of range: use 1..{queries.MAX_SCROLL_LIMIT}")
        page = queries.scroll_page(self._tables, self.store, queries.check_filter(filter_text),
                                   limit, queries.decode_token(token))
        items = queries.page_items(self.store, page)
        found = [] if items is None else [
            Item(key, items.labels[i], items.splits[i], dict(items.meta[i]),
                 np.asarray(items.vectors[i], np.float32).tolist() if vectors else None)
            for i, key in enumerate(items.keys)
        ]
        return Page(found, page.next_token or None, page.generation)

    @property
    def _tables(self) -> Tables:
        """The table filters are applied to, read once per store generation."""
        from featurebank.server.queries import Tables

        if self._filter_tables is None:
            self._filter_tables = Tables()
        return self._filter_tables

    def _count(self, filter_text: str) -> int:
        from featurebank.server import queries

        return queries.count(self._tables, self.store, queries.check_filter(filter_text))[0]

    def _set_metadata(self, metadata: dict[str, dict[str, Any]], replace: bool) -> Written:
        st = self._writable()
        _refuse_missing(st, list(metadata))
        return self._written(updated=int(st.set_meta(metadata, merge=not replace)))

    def _classify(self, q: Query, options: dict[str, Any]) -> list[Classification]:
        from featurebank.index.filters import parse

        clf = self._live()
        vectors, exclude = self._query(q)
        mode = options["mode"]
        preds = clf.classify(
            vectors, mode=mode, k=options["k"], top_n=options["top_n"],
            include_neighbors=options["include_neighbors"], exclude_ids=exclude,
            abstain_below=options["abstain_below"], where=parse(options["filter"]),
        )
        used = mode.lower() if mode else str(clf.default_mode)
        head = clf.head_generation if used != "knn" else None
        return [
            Classification(
                label=p.label,
                probability=float(p.probs[0]) if p.probs else 0.0,
                labels=list(p.labels),
                probabilities=[float(v) for v in p.probs],
                abstained=bool(p.abstained),
                mode=used,
                index_generation=int(clf.index_generation),
                head_generation=None if head is None else int(head),
                neighbors=[Neighbor(n.key, n.label, float(n.score)) for n in p.neighbors],
            )
            for p in preds
        ]

    def _suggest(self, n: int, strategy: str, label: str | None, filter: str) -> list[Suggestion]:
        from featurebank.classify.suggest import suggest
        from featurebank.index.filters import parse

        found = suggest(self._live(), n=n, strategy=strategy, label=label, where=parse(filter))
        return [Suggestion(s.key, float(s.score), list(s.labels), list(s.probs)) for s in found]

    def _audit(self, n: int, filter: str) -> list[Finding]:
        from featurebank.classify.audit import audit
        from featurebank.index.filters import parse

        return [_finding(f) for f in audit(self._live(), n=n, where=parse(filter))]

    def _quality(self, n: int, precision: float | None) -> Quality:
        from featurebank.classify.quality import Cache

        if self._quality_cache is None:
            self._quality_cache = Cache()
        return quality_of(self._quality_cache.run(self._live(), precision=precision, limit=n))

    def _keep(self, kind: str, keys: list[str]) -> Kept:
        from featurebank.classify.quality.decisions import keep

        kept = keep(self._writable(), kind, keys)
        return Kept(kept.kind, list(kept.keys), kept.label)

    def info(self) -> Info:
        """The bank's spec, counts, labels and live generations."""
        st = self.store
        _, codes, vocab = st.label_table()
        index_gen = current_generation(st.bank.indexes_dir)
        default_mode = None
        if index_gen is not None:
            default_mode = str(self._live().default_mode)
        return Info(
            bank=str(self.path),
            spec=st.spec.identity(),  # as GetInfo reports it: no file locations
            dim=int(st.spec.dim),
            count=int(st.count),
            labelled=int(np.count_nonzero(np.asarray(codes) >= 0)),
            labels=list(vocab),
            store_generation=int(st.generation),
            labels_generation=int(st.labels_generation),
            index_generation=index_gen,
            head_generation=current_generation(st.bank.heads_dir),
            default_mode=default_mode,
        )

    # ------------------------------------------------------------------ writes

    def _writable(self) -> store_mod.Store:
        if self._served is not None and self._served.running:
            raise FailedPrecondition(
                f"bank {self.path} is served at {self._served.address}: write through "
                f"featurebank.connect({self._served.address!r}) while it is"
            )
        return self.store

    def _upsert(
        self, q: Query, keys: list[str], labels: list[str | None] | None, splits: list[str] | None,
        metadata: list[Mapping[str, Any] | None] | None,
    ) -> Written:
        st = self._writable()
        vectors = self._embed(q)
        meta: list[dict[str, Any] | None] | None = [
            {"sha256": hashlib.sha256(item).hexdigest(), "size": len(item)}
            if isinstance(item, bytes) else None
            for item in q.images
        ] if q.kind == IMAGES else None  # fmt: skip
        if metadata is not None:
            user = [check_user_meta(k, m) for k, m in zip(keys, metadata, strict=True)]
            meta = [{**(m or {}), **u} for m, u in zip(meta or [None] * len(keys), user, strict=True)]
        present = set(keys) - set(st.missing(keys))
        st.put_batch(keys, vectors, labels=labels, splits=splits, meta=meta, replace=True)
        return self._written(added=len(keys) - len(present), replaced=len(present))

    def _set_labels(self, labels: dict[str, str | None]) -> Written:
        st = self._writable()
        _refuse_missing(st, list(labels))
        return self._written(updated=int(st.set_labels(labels)))

    def _delete(self, keys: list[str], ignore_missing: bool) -> Written:
        st = self._writable()
        if not ignore_missing:
            _refuse_missing(st, keys)
        gone = set(st.missing(keys))
        present = [k for k in keys if k not in gone]
        return self._written(deleted=int(st.delete(present)) if present else 0)

    def _written(self, **counts: int) -> Written:
        gen = current_generation(self.store.bank.indexes_dir)
        if gen is not None and self._classifier is not None:
            self._live()  # searchable at once, from the searcher's in-memory segment
        return Written(store_generation=int(self.store.generation), index_generation=gen, **counts)

    def build_index(self, **params: Any) -> Published:
        """Build and publish a new index generation (see FeatureBank.build_index)."""
        from featurebank.index.build import build_index

        manifest = build_index(self._writable(), **params)
        self._live()
        return Published(
            int(manifest["generation"]), current_generation(self.store.bank.heads_dir), manifest
        )

    def train_head(self, **params: Any) -> Published:
        """Train and publish a head; `params` are HeadParams fields (hidden, epochs, ...)."""
        from featurebank.classify.head_training import train_head

        manifest = train_head(self._writable(), **params)
        if current_generation(self.store.bank.indexes_dir) is not None:
            self._live()
        return Published(
            current_generation(self.store.bank.indexes_dir), int(manifest["generation"]), manifest
        )

    # ------------------------------------------------------------------ serving

    def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None, **options: Any
    ) -> Served:
        """Serve this bank over gRPC from this process (a background thread) until `stop()`.

        `port` 0 picks a free one (`Served.address` says which); `token` makes it required
        (for reads and writes); `options` are ServeConfig fields (max_batch_size, tls_cert,
        ...). While served, write through `featurebank.connect(served.address)`.
        """
        from featurebank.api.serving import Served

        if self._served is not None and self._served.running:
            raise FailedPrecondition(f"bank {self.path} is already served at {self._served.address}")
        self._served = Served.start(self.path, host, port, token, options)
        return self._served

    def close(self) -> None:
        """Stop serving (if it is), close the classifier and the store."""
        if self._served is not None:
            self._served.stop()
        if self._classifier is not None:
            self._classifier.close()
            self._classifier = None
        self.store.close()


def _finding(f: AuditFinding) -> Finding:
    return Finding(
        f.key, f.label, f.suggested, float(f.confidence), float(f.p_label),
        float(f.p_suggested), f.head_p_label, f.head_p_suggested,
        [Neighbor(nb.key, nb.label, float(nb.score)) for nb in f.neighbors],
    )


def quality_of(r: Report) -> Quality:
    """A `classify.quality.Report` as the API's result."""
    le = r.labels
    return Quality(
        items=r.items, labelled=r.labelled,
        estimated_wrong=None if le is None else float(le.estimated_wrong),
        wrong_per_class={} if le is None else {c.label: float(c.wrong) for c in le.classes},
        swapped=[] if le is None else [(s.a, s.b, float(s.count)) for s in le.swaps],
        label_errors=[] if le is None else [_finding(f) for f in le.findings],
        duplicates=[
            Duplicate([m.key for m in g.members], [m.split for m in g.members], g.exact,
                      float(min(p.distance for p in g.pairs)),
                      float(max(p.match for p in g.pairs)))
            for g in r.duplicates.groups
        ],
        leaks=[Leak(x.train, x.held_out, x.split, float(x.distance), x.exact, float(x.match))
               for x in r.duplicates.leaks],
        outliers=[Outlier(o.key, float(o.score), float(o.distance),
                          [(k, float(d)) for k, d in o.neighbors]) for o in r.outliers],
        splits=[SplitCheck(c.split, c.items, c.uncovered, list(c.uncovered_keys),
                           float(c.label_distance), list(c.missing_labels),
                           list(c.unseen_labels)) for c in r.splits],
        counts=dict(r.counts), index_generation=r.index_generation,
        labels_generation=r.labels_generation, seconds=float(r.seconds),
    )


def _neighbor(h: Any) -> Neighbor:
    return Neighbor(h.key, h.label, float(h.score), h.meta)


def _refuse_missing(st: store_mod.Store, keys: list[str]) -> None:
    missing = st.missing(keys)
    if missing:
        listed = ", ".join(shown(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NotFound(f"unknown key{'s' if len(missing) > 1 else ''} {listed}{more}")


# ---------------------------------------------------------------------- opening


def create(
    path: str | os.PathLike[str],
    *,
    backbone: str | None = None,
    layer: str | None = None,
    weights: str = "imagenet",
    dim: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    resize: str = "crop",
    pooling: str = "avg",
    dtype: str | None = None,
    preprocessing: str | None = None,
) -> LocalBank:
    """A new, empty bank at `path` for the vectors of a backbone, or of `dim` made elsewhere.

    `backbone` is a keras.applications family (e.g. "resnet50") or a `.keras` model file
    (then `layer` names the layer whose output is the feature); `weights` "imagenet",
    "none" (random: for tests) or a weights file. Without a backbone, `dim` makes a bank of
    external vectors. `dtype` defaults to float16 for a model's features, float32 otherwise.
    """
    if (backbone is None) == (dim is None):
        raise InvalidInput("create needs backbone=... (a model) or dim=... (vectors made elsewhere)")
    embedder = None
    if backbone is None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"dim must be a positive integer, got {shown(dim)}")
        spec = Spec.external("external", dim, dtype or "float32")
    else:
        from featurebank.embedder.embedding import Embedder, make_spec

        wanted = make_spec(backbone, weights=weights, layer=layer, image_size=image_size,
                           resize=resize, pooling=pooling, dtype=dtype or "float16",
                           preprocessing=preprocessing)  # fmt: skip
        embedder = Embedder.from_spec(wanted)
        spec = embedder.spec
    try:
        st = store_mod.create(path, spec)
    except FailedPrecondition as e:
        raise FailedPrecondition(f"{e} (open it with featurebank.open)") from None
    return LocalBank(st, embedder)


def open_bank(path: str | os.PathLike[str]) -> LocalBank:
    """The bank at `path` (made by `featurebank.create` or `featurebank embed`)."""
    return LocalBank(store_mod.open(path))
