"""What a job says about where it ran, and the bank's job record of how it ran.

The report (devices, precision, batch size and where that size came from) is printed
when the job starts, merged into its summary, and kept in `BANK/jobs/embed.json` beside
the batch sizes found to fit and the job's `EmbedParams` (the next job starts from them);
the work per device shows that every device took part.
"""

from __future__ import annotations

import time
from typing import Any

from featurebank.core.bank import Bank
from featurebank.core.errors import InvalidInput
from featurebank.core.params import EMBED_RECORD_KEY, EmbedParams
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


def recorded(bank: Bank) -> EmbedParams:
    """The EmbedParams the bank's last embed job used (the defaults before any job ran)."""
    try:
        return EmbedParams.from_record(bank.read_job_record(JOB))
    except (InvalidInput, TypeError) as e:
        raise InvalidInput(
            f"{bank.jobs_dir / (JOB + '.json')}: damaged {EMBED_RECORD_KEY}: {e} "
            "(remove the file to start from the defaults)"
        ) from e


def remember(bank: Bank, params: EmbedParams, started: dict[str, Any] | None = None) -> None:
    """Keep the params of the job writing now, and its report (as `last_run`), in the bank's
    job record; the caller holds the bank's writer lock."""
    record = bank.read_job_record(JOB)
    record[EMBED_RECORD_KEY] = params.to_dict()
    if started is not None:
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
