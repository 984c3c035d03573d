"""Every bound a request must keep and every default a request or the server falls back on.

Why one module: the edge checks (`validation`), the servicer, the engine and the server
config all read these, and an error message quoting a bound must quote the one enforced.
A request field left at 0 (proto3's unset) means the DEFAULT_ beside its MAX_.
"""

from __future__ import annotations

MiB = 1 << 20

# ---- one request ------------------------------------------------------------------------------

MAX_K = 1024  # neighbours of one Classify or Search
DEFAULT_SEARCH_K = 10  # Search k=0; Classify k=0 means the voter's own (the head's tuned k)
MAX_TOP_N = 1000
DEFAULT_TOP_N = 5
MAX_RANKED = 10_000  # items of one Suggest or Audit
DEFAULT_RANKED = 100
MAX_KEY_BYTES = 1024
MAX_LABEL_FILTER = 1024  # labels in one Search filter
MAX_BATCH_INPUTS = 4096  # inputs of one ClassifyBatch
MAX_UPSERT_ITEMS = 100_000  # items of one Upsert stream
MAX_THUMBNAILS = 1000  # keys of one GetThumbnails
MAX_OPERATION_ID = 64  # operation ids are 32 hex digits

# ---- what the server holds at once ------------------------------------------------------------

DEFAULT_MAX_MESSAGE_BYTES = 16 * MiB  # largest gRPC message the server takes or sends
DEFAULT_STREAM_BYTES = 256 * MiB  # bytes one Upsert stream may hold before it commits
DEFAULT_TOTAL_BYTES = 1024 * MiB  # bytes all Upsert streams in flight may hold
DEFAULT_MAX_QUEUED_ROWS = 100_000  # Upsert items waiting for the writer before Overloaded
DEFAULT_MAX_BATCH_SIZE = 64  # requests per dynamic batch (embed, classify, search)
DEFAULT_BATCH_TIMEOUT_MS = 2.0  # how long a batch waits to grow
DEFAULT_SEARCH_THREADS = 2  # classify and search batches running at once
