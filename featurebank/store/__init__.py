"""The store layer: the bank's LMDB feature store (no TensorFlow, no FAISS).

`store.py` is the public face (open, create, Store); `env`, `codec`, `rows`, `items`
and `compact` are its parts: the environment and its locks, record encodings, block
rows, lazy item views, and compaction into a fresh environment.
"""

from featurebank.store.items import Changes, Items
from featurebank.store.store import BankLike, Store, borrowed, create, open, open_or_create

__all__ = ["BankLike", "Changes", "Items", "Store", "borrowed", "create", "open", "open_or_create"]
