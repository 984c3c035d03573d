"""Helpers for the replication tests: a store's records, to compare a replica with its primary."""

from __future__ import annotations

from typing import Any

from featurebank.store import replication


def dump(st: Any, log_after: int = 0) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every record of every database a replica copies (the log_start counter aside, and the
    log's entries up to `log_after`: a primary trims its log, a replica keeps its own)."""
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    with st._sh().read() as (txn, h):
        for db in h.dbs:
            out[db] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=h.dbs[db])
                       if (db, bytes(k)) != ("info", b"log_start")
                       and not (db == "log" and int.from_bytes(bytes(k)[:8], "big") <= log_after)]
    return out


def same_records(replica: Any, primary: Any) -> bool:
    """The replica's store holds the primary's records (the log from where both keep it)."""
    start = max(replication.log_start(primary), replication.log_start(replica))
    return dump(replica, start) == dump(primary, start)
