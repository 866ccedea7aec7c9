"""Integrity at start: the manifest of a data directory and the check of its store files.

The manifest (L{MANIFEST}, JSON beside the stores) records which stores have held data; it is
written atomically when a store first holds a value. At start, a SQLite store file that is
missing or empty while the manifest says it held data, or that fails C{PRAGMA quick_check}, is
refused with one line naming it (see docs/DESIGN.md, "When storage fails").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from chainstore.storage import sqlitedbm

#: The file beside the stores that records which of them have held data.
MANIFEST = "stores.json"


class StoreIntegrityError(Exception):
    """A store file is missing, empty or corrupt while the manifest says it held data (or
    fails SQLite's check whatever the manifest says); the message names the file."""


class Manifest:
    """Which stores of a data directory have held data: the JSON file L{MANIFEST} beside them,
    written (atomically) when a store first holds a value."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, MANIFEST)
        self.held: set[str] = set()
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.held = set(json.load(f)["held_data"])
            except (ValueError, KeyError, TypeError) as e:
                raise StoreIntegrityError(
                    f"{self.path} is not a store manifest ({e}); restore it, or remove the "
                    f"data directory {directory} to start this server empty") from None

    def record(self, store: Any) -> None:
        """Record that C{store} (a L{chainstore.storage.store.Store}) holds data."""
        if store.name in self.held:
            return
        self.held.add(store.name)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"held_data": sorted(self.held)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_stores(directory: str, manifest: Manifest, names: Iterable[str]) -> None:
    """Raise L{StoreIntegrityError} if a SQLite store file of C{directory} is missing or empty
    while the manifest says it held data, or fails C{PRAGMA quick_check}."""
    restore = (f"restore it, or remove the data directory {directory} to start this server "
               f"empty (under an ECS: once the ECS has repaired it away)")
    for name in names:
        path = os.path.join(directory, name + ".sqlite")
        size = os.path.getsize(path) if os.path.exists(path) else None
        if not size:
            if name in manifest.held:
                what = "missing" if size is None else "empty (0 bytes)"
                raise StoreIntegrityError(
                    f"store file {path} is {what}, but {manifest.path} records that it held "
                    f"data; {restore}")
            continue
        problem = sqlitedbm.check_file(path)
        if problem is not None:
            raise StoreIntegrityError(
                f"store file {path} fails SQLite's integrity check ({problem}); {restore}")
