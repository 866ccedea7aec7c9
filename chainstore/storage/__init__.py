"""Persistent storage: dbm-interface backends and the three named stores of a server."""

from chainstore.storage.integrity import StoreIntegrityError
from chainstore.storage.store import BACKENDS, STORE_NAMES, Store, StoreSet

__all__ = ["BACKENDS", "STORE_NAMES", "Store", "StoreIntegrityError", "StoreSet"]
