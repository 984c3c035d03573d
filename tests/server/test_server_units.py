"""Server parts that need no bank: tokens, status mapping, batching, config checks, validation."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank.core import errors
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound
from featurebank.server.app import ServeConfig, is_loopback
from featurebank.server.auth import READ, WRITE, Tokens, required_role
from featurebank.server.batching import Batcher, isolate
from featurebank.server.bounds import DEFAULT_TOP_N
from featurebank.server.group_commit import UpsertRow
from featurebank.server.reads import ClassifyOptions
from featurebank.server.status import to_status
from featurebank.server.validation import (
    UpsertImage,
    check_classify,
    check_inputs,
    check_k,
    check_labels,
    check_mode,
    check_operation_id,
    check_split,
    check_top_n,
    check_upsert_item,
    check_vector,
)
from featurebank.v1 import featurebank_pb2 as pb


def test_tokens_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\nread r-token\n\nWRITE w-token\n")
    tokens = Tokens.load(f, environ={"FEATUREBANK_READ_TOKEN": "env-read"})
    assert tokens.role_of("r-token") == READ
    assert tokens.role_of("env-read") == READ
    assert tokens.role_of("w-token") == WRITE
    assert tokens.role_of("nope") is None
    assert "r-token" not in repr(tokens) and "w-token" not in repr(tokens)


def test_tokens_file_errors_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("read a\nadmin b\n")
    with pytest.raises(InvalidInput, match=r"tokens:2: unknown role 'admin'"):
        Tokens.load(f, environ={})
    f.write_text("read\n")
    with pytest.raises(InvalidInput, match=r"tokens:1: expected 'ROLE TOKEN'"):
        Tokens.load(f, environ={})
    assert not Tokens.load(None, environ={}).enabled


def test_roles_of_methods() -> None:
    svc = "/featurebank.v1.FeatureBank/"
    for m in ("Classify", "ClassifyBatch", "Search", "Embed", "GetInfo"):
        assert required_role(svc + m) == READ
    for m in ("Upsert", "SetLabels", "Delete", "SetSplits", "KeepFinding", "RebuildIndex",
              "GetOperation", "Future"):
        assert required_role(svc + m) == WRITE
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_every_error_maps_to_a_known_status() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.FeaturebankError)]
    assert len(classes) >= 6
    for cls in classes:
        code, message = to_status(cls("what was wrong"))
        assert code is not grpc.StatusCode.UNKNOWN
        assert message == "what was wrong"
    assert to_status(errors.NotFound("unknown key 'x'"))[0] is grpc.StatusCode.NOT_FOUND
    assert to_status(errors.InvalidInput("x"))[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(errors.FailedPrecondition("x"))[0] is grpc.StatusCode.FAILED_PRECONDITION
    assert to_status(errors.StorageFull("x"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    code, message = to_status(ZeroDivisionError("boom"))
    assert code is grpc.StatusCode.INTERNAL and "boom" in message


def test_batcher_groups_concurrent_requests() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        gate.wait(5)  # first batch holds the executor so the others queue up
        return [i * 10 for i in items]

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            b: Batcher[int, int] = Batcher(
                "t", run, pool, max_batch_size=8, timeout_ms=1,
                on_batch=lambda _, n: sizes.append(n),
            )
            first = asyncio.ensure_future(b.submit(-1))
            await asyncio.sleep(0.05)
            rest = asyncio.ensure_future(b.submit_many(list(range(20))))
            await asyncio.sleep(0.05)
            gate.set()
            out = [await first, *await rest]
            await b.close()
            return out

    out = asyncio.run(main())
    assert out == [-10] + [i * 10 for i in range(20)]
    assert sizes[0] == 1 and max(sizes) == 8 and sum(sizes) == 21


def test_a_second_batch_starts_beside_a_running_one_only_for_a_queue_worth_it() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        if -1 in items:
            gate.wait(5)  # the first batch runs until the gate opens
        return items

    async def main() -> list[list[int]]:
        with ThreadPoolExecutor(2) as pool:
            b: Batcher[int, int] = Batcher(
                "t", run, pool, max_batch_size=8, timeout_ms=1, max_inflight=2,
                on_batch=lambda _, n: sizes.append(n),
            )  # a quarter of a batch: 2 queued items
            first = asyncio.ensure_future(b.submit(-1))
            await asyncio.sleep(0.05)
            lone = asyncio.ensure_future(b.submit(1))
            await asyncio.sleep(0.05)
            seen = [list(sizes)]  # one item queued: it waits for the running batch
            pair = asyncio.ensure_future(b.submit(2))
            await asyncio.sleep(0.05)
            seen.append(list(sizes))  # two queued: a batch of its own beside the first
            gate.set()
            assert [await first, await lone, await pair] == [-1, 1, 2]
            await b.close()
            return seen

    assert asyncio.run(main()) == [[1], [1, 2]]


def test_batcher_off_runs_one_at_a_time() -> None:
    sizes: list[int] = []

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            b: Batcher[int, int] = Batcher(
                "t", lambda xs: [x + 1 for x in xs], pool, max_batch_size=1,
                on_batch=lambda _, n: sizes.append(n),
            )
            out = await b.submit_many(list(range(10)))
            await b.close()
            return out

    assert asyncio.run(main()) == list(range(1, 11))
    assert sizes == [1] * 10


def test_isolate_fails_only_the_bad_item() -> None:
    def run(items: list[int]) -> list[int]:
        if any(i < 0 for i in items):
            raise InvalidInput("negative")
        return items

    out = isolate(run, [1, -2, 3])
    assert out[0] == 1 and out[2] == 3
    assert isinstance(out[1], InvalidInput)


def test_batcher_delivers_errors_to_callers() -> None:
    def run(items: list[int]) -> list[int]:
        raise FailedPrecondition("no index yet")

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            b: Batcher[int, int] = Batcher("t", run, pool)
            with pytest.raises(FailedPrecondition, match="no index yet"):
                await b.submit(1)
            await b.close()

    asyncio.run(main())


def test_non_loopback_needs_tls_or_tokens(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(FailedPrecondition, match="refusing to listen on 0.0.0.0"):
        ServeConfig(bank=tmp_path, host="0.0.0.0").check()
    ServeConfig(bank=tmp_path, host="0.0.0.0", insecure=True).check()
    tokens = Tokens({"read": ["x"]})
    ServeConfig(bank=tmp_path, host="0.0.0.0", tokens=tokens).check()
    with pytest.raises(InvalidInput, match="--tls-cert and --tls-key go together"):
        ServeConfig(bank=tmp_path, tls_cert=tmp_path / "c").check()
    with pytest.raises(NotFound, match="--tls-cert .* does not exist"):
        ServeConfig(bank=tmp_path, tls_cert=tmp_path / "c", tls_key=tmp_path / "k").check()
    with pytest.raises(NotFound, match="tokens file .* does not exist"):
        Tokens.load(tmp_path / "missing", environ={})


def test_validation_messages() -> None:
    assert check_vector([1.0, 2.0], 2).dtype == np.float32
    with pytest.raises(InvalidInput, match="has 3 values; the bank's vectors have dim 2"):
        check_vector([1.0, 2.0, 3.0], 2)
    with pytest.raises(InvalidInput, match="NaN or infinity at position 1"):
        check_vector([1.0, float("nan")], 2)
    with pytest.raises(InvalidInput, match="is empty"):
        check_vector([], 2)
    assert check_k(0, None) is None and check_k(5, None) == 5
    with pytest.raises(InvalidInput, match="k=5000 is out of range"):
        check_k(5000, None)
    assert check_top_n(0) == 5
    assert check_mode(0) is None and check_mode(2) == "head"
    with pytest.raises(InvalidInput, match="unknown mode 9"):
        check_mode(9)
    assert check_split("", "x") == "none"
    with pytest.raises(InvalidInput, match="split 'holdout'"):
        check_split("holdout", "item 0")


def test_edge_checks_tell_oneofs_apart_and_fill_defaults() -> None:
    assert check_classify(pb.MODE_KNN, 0, 0, True, 0.0) == ClassifyOptions(
        "knn", None, DEFAULT_TOP_N, True, None
    )
    assert check_classify(0, 3, 2, False, 0.9).abstain_below == 0.9
    with pytest.raises(InvalidInput, match="abstain_below"):
        check_classify(0, 0, 0, False, 1.5)
    inputs = check_inputs(
        [pb.Input(key="a"), pb.Input(vector=pb.Vector(values=[1.0, 2.0])), pb.Input(image=b"x")], 2
    )
    assert inputs.keys == [(0, "a")] and inputs.images == [(2, b"x")]
    assert [i for i, _ in inputs.vectors] == [1] and inputs.where(1) == "inputs[1]"
    with pytest.raises(InvalidInput, match=r"^input is empty: set image, vector or key$"):
        check_inputs([pb.Input()], 2)
    with pytest.raises(InvalidInput, match=r"inputs\[1\]\.vector has 1 values"):
        check_inputs([pb.Input(key="a"), pb.Input(vector=pb.Vector(values=[1.0]))], 2)
    seen: dict[str, int] = {}
    row = check_upsert_item(pb.UpsertItem(key="a", vector=pb.Vector(values=[1, 2]), uri="u"), 0, 2, seen)
    assert isinstance(row, UpsertRow) and row.meta == {"uri": "u"} and row.split == "none"
    image = check_upsert_item(pb.UpsertItem(key="b", image=b"png", split="val"), 1, 2, seen)
    assert isinstance(image, UpsertImage) and image.where == "item 1 (key 'b') image"
    with pytest.raises(InvalidInput, match="item 2 \\(key 'a'\\): key repeats item 0"):
        check_upsert_item(pb.UpsertItem(key="a", image=b"png"), 2, 2, seen)
    with pytest.raises(InvalidInput, match="has neither image nor vector"):
        check_upsert_item(pb.UpsertItem(key="c"), 3, 2, seen)
    assert check_labels([pb.LabelAssignment(key="a", label=""), pb.LabelAssignment(key="b", label="x")]) == {
        "a": None, "b": "x"
    }
    with pytest.raises(InvalidInput, match="appears twice"):
        check_labels([pb.LabelAssignment(key="a"), pb.LabelAssignment(key="a")])
    with pytest.raises(InvalidInput, match="longer than 64 characters"):
        check_operation_id("f" * 65)


def test_status_messages_never_carry_the_banks_folder() -> None:
    from featurebank.server.status import hide_path, redacted

    hide_path("/srv/hidden-banks/b1")
    message = ("key 'x' is not in bank /srv/hidden-banks/b1; /srv/hidden-banks/b1/indexes/2/"
               "index.faiss is damaged: run `featurebank store repair --bank /srv/hidden-banks/b1`")
    assert redacted(message) == (
        "key 'x' is not in this bank; this bank's indexes/2/index.faiss is damaged: "
        "run `featurebank store repair --bank BANK`"
    )
