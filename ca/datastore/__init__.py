"""The datastore: SQLAlchemy models and the one repository that queries them."""

from ca.datastore.records import CaKeyRecord, EntryRecord, NodeRecord, StoredBundle
from ca.datastore.repository import Datastore, Transaction

__all__ = [
    "CaKeyRecord",
    "Datastore",
    "EntryRecord",
    "NodeRecord",
    "StoredBundle",
    "Transaction",
]
