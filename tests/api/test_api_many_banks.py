"""featurebank.connect(..., bank=NAME) against a real server of several banks."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

import featurebank as fb
from featurebank.server.app import ServeConfig
from featurebank.server.client import RemoteError
from tests.support.server import RunningServer, clustered, free_port


def test_connect_chooses_a_bank_and_answers_like_the_bank_in_process(tmp_path: Path) -> None:
    root = tmp_path / "banks"
    made = {}
    for name, dim, seed in (("left", 8, 1), ("right", 20, 2)):
        bank = fb.create(root / name, dim=dim)
        keys, vectors, labels = clustered(6, dim, seed=seed)
        bank.upsert(vectors, keys=[f"{name}:{k}" for k in keys], labels=labels, splits="train")
        bank.build_index(k=5)
        made[name] = (bank.search(vectors[:3], k=4), vectors)
        bank.close()
    with RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs:
        for name, (local_hits, vectors) in made.items():
            remote = fb.connect(rs.target, bank=name)
            try:
                assert repr(remote) == f"RemoteBank({rs.target!r}, bank={name!r})"
                assert remote.client.info().name == name and remote.dim == vectors.shape[1]
                hits = remote.search(vectors[:3], k=4)
                assert [row.keys for row in hits] == [row.keys for row in local_hits]
                assert all(key.startswith(f"{name}:") for row in hits for key in row.keys)
                written = remote.upsert(vectors[:1], keys=[f"{name}:extra"])
                assert written.added == 1
                assert remote.info().count == len(vectors) + 1
            finally:
                remote.close()
        missing = fb.connect(rs.target, bank="nowhere")
        with pytest.raises(RemoteError) as err:
            missing.info()
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "'nowhere'" in err.value.details
        missing.close()
