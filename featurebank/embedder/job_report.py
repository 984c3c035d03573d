"""What a job says about where it ran: its device report and the bank's job record.

The report (devices, precision, batch size and where that size came from) is printed
when the job starts, merged into its summary, and kept in `BANK/jobs/embed.json` beside
the batch sizes found to fit; the work per device shows that every device took part.
"""

from __future__ import annotations

import time
from typing import Any

from featurebank.core.bank import Bank
from featurebank.embedder.batch_size import JOB
from featurebank.embedder.embedding import Embedder


def report(embedder: Embedder, size: int, size_from: str) -> dict[str, Any]:
    """Where and how a job runs: for its start-up line, its summary and the job record."""
    placement = embedder.placement
    return {
        "device": f"{placement.describe()}; batch {size} ({size_from})",
        "devices": list(placement.devices),
        "precision": placement.precision,
        "batch_size": size,
        "batch_size_from": size_from,
        "layer": embedder.spec.layer,
    }


def remember(bank: Bank, started: dict[str, Any]) -> None:
    """Keep the report of the job starting now in the bank's job record (as `last_run`)."""
    record = bank.read_job_record(JOB)
    record["last_run"] = dict(started, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    bank.write_job_record(JOB, record)


def work_since(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Batches and images per device during this job (the model may be reused across jobs)."""
    zero = {"batches": 0, "images": 0}
    return {
        d: {k: v - before.get(d, zero)[k] for k, v in work.items()} for d, work in after.items()
    }
