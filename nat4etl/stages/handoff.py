"""Arrays one stage decoded, handed to a later stage of the same build instead of re-read.

``unpack`` decodes the population recording into (channels, samples) float32 arrays and
writes them as ``pop_signals``, and the site files' spike times as ``site_spikes``;
``rebin-sites`` needs exactly those. Of the spike times it needs only their sample at the
file's rate, so unpack hands over ``rebin_sites.with_spike_samples`` of the table (half the
memory), which is also what rebin-sites makes of the file when it reads it. Reading them
back means decoding ~550 MB of Parquet lists into freshly allocated memory (2 s here, much
of it page faults). Within one build the Store object is shared by every stage, so unpack
leaves them here and rebin-sites takes them.

Safety: an entry is tied to the identity of the file it mirrors (inode, size, mtime), taken
once the file is written. Files are never modified in place, only replaced by rename, so if
anything rewrote the table in between the identity differs and the caller reads the file as
usual. ``take`` removes the entry, so the arrays live no longer than their one consumer
needs them; a separate stage command starts with an empty Store and always reads the file.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def keep(store, table: str, area: str, value: Any) -> None:
    """Leave ``value`` (what ``table``'s file for ``area`` holds, decoded) for a later stage.
    Call after the file is written."""
    identity = _identity(store.table_file(table, area))
    if identity is not None:
        _KEPT.setdefault(store, {})[(table, area)] = (identity, value)


def take(store, table: str, area: str) -> Any | None:
    """The value kept for ``table``/``area`` if its file is still the one written, else
    None; either way the entry is gone afterwards."""
    entry = _KEPT.get(store, {}).pop((table, area), None)
    if entry is None:
        return None
    identity, value = entry
    return value if identity == _identity(store.table_file(table, area)) else None


def has(store, table: str, area: str) -> bool:
    return (table, area) in _KEPT.get(store, {})
