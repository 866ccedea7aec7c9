"""Persistent storage: the backends (one L{Backend} protocol) and the three named stores of a
server."""

from chainstore.storage.backend import Backend
from chainstore.storage.integrity import StoreIntegrityError
from chainstore.storage.store import BACKENDS, STORE_NAMES, Store, StoreSet

__all__ = ["BACKENDS", "Backend", "STORE_NAMES", "Store", "StoreIntegrityError", "StoreSet"]
