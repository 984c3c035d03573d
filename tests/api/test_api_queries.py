"""Filters, thresholds, groups, recommend, scroll, count and metadata in the Python API, the
same in process and over gRPC (real store, real index, a real server on a loopback port)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import featurebank as fb
from featurebank.core.errors import InvalidInput
from tests.support.server import clustered

DIM = 16


def both(bank: fb.LocalBank, remote: fb.FeatureBank, vectors: np.ndarray, keys: list[str]) -> None:
    for b in (bank, remote):
        hits = b.search(vectors[0], k=5, filter="meta.n < 10", include_metadata=True)
        assert len(hits.neighbors) == 5
        assert all(n.metadata is not None and n.metadata["n"] < 10 for n in hits.neighbors)
        g = b.search(vectors[0], k=4, group_by="label", group_size=2)
        assert sorted(g.labels) == ["cat", "cat", "dog", "dog"] or max(g.labels.count(x) for x in g.labels) == 2
        cut = b.search(vectors[0], k=30).scores[10]
        t = b.search(vectors[0], k=30, score_threshold=cut)
        assert 0 < len(t.neighbors) < 30 and min(t.scores) >= cut
        r = b.recommend(fb.keys(keys[0], keys[1]), fb.keys(keys[-1]), k=3)
        assert len(r.neighbors) == 3 and not {keys[0], keys[1], keys[-1]} & set(r.keys)
        assert b.recommend(vectors[:2], k=2, strategy="best_score", filter='label == "dog"').labels == ["dog", "dog"]
        assert b.count() == len(keys) and b.count("meta.even == true") == len(keys) // 2
        page = b.scroll("meta.even == true", limit=7)
        assert len(page.items) == 7 and page.keys == sorted(page.keys) and page.next_page_token
        rest = b.scroll("meta.even == true", limit=1000, page_token=page.next_page_token)
        assert rest.next_page_token is None and len(page.items) + len(rest.items) == len(keys) // 2
        assert all(i.metadata["even"] for i in page.items + rest.items)
        c = b.classify(vectors[0], mode="knn", filter='label == "dog"')
        assert c.label == "dog"
        with pytest.raises(InvalidInput, match="position 9"):
            b.search(vectors[0], filter="meta.n >")
        with pytest.raises(InvalidInput, match="group_size needs group_by"):
            b.search(vectors[0], group_size=2)


def test_queries_in_process_and_over_grpc(tmp_path: Path) -> None:
    bank = fb.create(tmp_path / "b", dim=DIM)
    keys, vectors, labels = clustered(10, DIM, classes=("cat", "dog"))
    bank.upsert(vectors, keys=keys, labels=labels,
                metadata=[{"n": i, "even": i % 2 == 0} for i in range(len(keys))])
    bank.build_index()
    assert bank.set_metadata({keys[0]: {"tag": "first"}}).updated == 1
    assert bank.count('meta.tag == "first"') == 1
    with bank.serve() as served, fb.connect(served.address) as remote:
        both(bank, remote, vectors, keys)
        assert remote.set_metadata({keys[1]: {"tag": "second"}}, replace=True).updated == 1
        assert remote.count("meta.tag exists") == 2 and remote.count("meta.n exists") == len(keys) - 1
        remote.upsert(vectors[:1] + 0.001, keys=["new"], metadata={"tag": "new"})
        assert remote.search(vectors[0], k=1, filter='meta.tag == "new"').keys == ["new"]
    bank.close()
