"""Oversized and malformed request fields get their own status and a short message.

Each case sends one hostile value to a real server and checks the status code (never
RESOURCE_EXHAUSTED "Stream removed" because an echoed value burst the status trailer,
never UNKNOWN) and that the message names the field while staying bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.server.status import MAX_MESSAGE_BYTES
from featurebank.v1 import featurebank_pb2 as pb
from tests.support.server import RunningServer, free_port, make_vector_bank

DIM = 16
HUGE = "x" * 100_000
WIDE = "\u00e9\u4e2d\U0001f600" * 30_000  # multi-byte characters: 3x longer percent-encoded
VEC = [0.1] * DIM


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureBankClient]:
    bank = make_vector_bank(tmp_path_factory.mktemp("bank") / "bank", dim=DIM, n_per_class=10)
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs, FeatureBankClient(
        rs.target, timeout=60, max_message_bytes=64 << 20
    ) as c:
        yield c


def upsert(**fields: Any) -> Callable[[FeatureBankClient], Any]:
    data = {"key": "k", "vector": VEC, **fields}
    return lambda c: c.upsert([pb.UpsertItem(**{k: v for k, v in data.items() if k != "vector"},
                                             vector=pb.Vector(values=data["vector"]))])


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
CASES: dict[str, tuple[Callable[[FeatureBankClient], Any], grpc.StatusCode | None, str]] = {
    "operation id 100k": (lambda c: c.get_operation(HUGE), INVALID, "operation id"),
    "operation id wide": (lambda c: c.get_operation(WIDE), INVALID, "operation id"),
    "operation id 64 unknown": (lambda c: c.get_operation("f" * 64), NOT_FOUND, "no operation"),
    "label filter 100k": (lambda c: c.search(vector=VEC, labels=[HUGE]), INVALID, "labels filter"),
    "label filter wide": (lambda c: c.search(vector=VEC, labels=[WIDE]), INVALID, "labels filter"),
    "label filter 5000 labels": (
        lambda c: c.search(vector=VEC, labels=[f"l{i}" for i in range(5000)]), INVALID,
        "at most 1024",
    ),
    "label filter 1000 unknown": (
        lambda c: c.search(vector=VEC, labels=[f"{i}-" + "y" * 390 for i in range(1000)]),
        INVALID, "unknown labels",
    ),
    "label filter empty label": (lambda c: c.search(vector=VEC, labels=["cat", ""]), INVALID,
                                 "is empty"),
    "search key 100k": (lambda c: c.search(key=HUGE), INVALID, "longer than 1024 bytes"),
    "classify key unknown": (lambda c: c.classify(key="z" * 1000), NOT_FOUND, "z"),
    "classify batch 1000 unknown keys": (
        lambda c: c.classify_batch([pb.Input(key=f"{i}" + "q" * 1000) for i in range(1000)]),
        NOT_FOUND, "is not in this bank",
    ),
    "upsert key 100k": (upsert(key=HUGE), INVALID, "item 0 key"),
    "upsert split 100k": (upsert(split=HUGE), INVALID, "split"),
    "upsert split wide": (upsert(split=WIDE), INVALID, "split"),
    "upsert label 100k": (upsert(label=HUGE), INVALID, "longer than 400 bytes"),
    "upsert vector NaN": (upsert(vector=[float("nan")] * DIM), INVALID, "NaN"),
    "upsert vector wrong dim": (upsert(vector=[0.1] * 3), INVALID, "dim 16"),
    "set labels label 100k": (lambda c: c.set_labels({"cat/1-0": HUGE}), INVALID, "400 bytes"),
    "set labels 2000 unknown keys": (
        lambda c: c.set_labels({f"{i}" + "w" * 1000: "cat" for i in range(2000)}), NOT_FOUND,
        "and 1995 more",
    ),
    "delete 2000 unknown keys": (
        lambda c: c.delete([f"{i}" + "v" * 1000 for i in range(2000)]), NOT_FOUND, "and 1995 more",
    ),
    "delete key 100k": (lambda c: c.delete([HUGE]), INVALID, "longer than 1024 bytes"),
    "rebuild factory 100k": (lambda c: c.rebuild_index(factory=HUGE, wait=True, timeout=60),
                             None, "longer than 256 characters"),
    "rebuild factory 1000": (lambda c: c.rebuild_index(factory="IVF" * 333, wait=True,
                                                       timeout=60), None, "factory"),
    "rebuild transform 100k": (lambda c: c.rebuild_index(transform=HUGE, wait=True, timeout=60),
                               None, "transform"),
    "rebuild metric 100k": (lambda c: c.rebuild_index(metric=HUGE, wait=True, timeout=60),
                            None, "metric"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_field_gets_its_status_and_a_bounded_message(client: FeatureBankClient,
                                                             case: str) -> None:
    call, code, words = CASES[case]
    if code is None:  # refused at once, or by the background job through its operation
        try:
            op = call(client)
            assert op.done and op.error.code == "INVALID_ARGUMENT", op
            details = op.error.message
        except RemoteError as e:
            assert e.code == INVALID, (e.code, e.details[:200])
            details = e.details
        assert words in details, details[:300]
    else:
        with pytest.raises(RemoteError) as e:
            call(client)
        assert e.value.code == code, (e.value.code, e.value.details[:200])
        details = e.value.details
        assert words in details, details[:300]
    assert len(details.encode()) <= MAX_MESSAGE_BYTES, len(details)
    assert client.health() == "SERVING"


def test_the_status_bound_cuts_any_message() -> None:
    from featurebank.core.errors import InvalidInput, shown
    from featurebank.server.status import to_status

    code, message = to_status(InvalidInput("bad: " + WIDE))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message.encode()) <= MAX_MESSAGE_BYTES and "message cut" in message
    assert shown("abc") == "'abc'"
    assert shown(HUGE, 10) == "'xxxxxxxxxx'... (100000 characters)"
