"""nat4etl: the NAT4 auditory-cortex dataset as a columnar Parquet store.

Read a built store with::

    import nat4etl

    store = nat4etl.open("./nat4")
    spec = store.spectrograms("A1", subset="est")  # float32 (S, F, T)
    resp = store.responses("A1", subset="val")  # float32 (S, N, R, T)

Importing this package is cheap: the reader's dependencies (pyarrow, polars) load on first
use, and nat4etl never imports torch or jax (``torch.from_dlpack(arr)`` takes the arrays).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"
#: bump when a table's schema changes incompatibly (readers refuse other versions)
SCHEMA_VERSION = 2
__all__ = ["Nat4Store", "__version__", "open"]

if TYPE_CHECKING:
    from nat4etl.reader import Nat4Store


def open(path: str | os.PathLike) -> Nat4Store:  # noqa: A001 - the public name is `open`
    """Open a built nat4etl store for reading.

    Parameters
    ----------
    path
        The store directory (the ``--out`` of ``nat4etl build``).

    Returns
    -------
    Nat4Store
        Pinned to the generation published when it was opened: a concurrent rebuild never
        mixes into its results. Close it (or use ``with``) to release that generation.

    Raises
    ------
    MissingTableError
        ``path`` is not a built store.
    SchemaError
        The store was written by an incompatible nat4etl schema version.
    """
    from nat4etl.reader import open_store

    return open_store(path)


def __getattr__(name: str):
    if name == "Nat4Store":
        from nat4etl.reader import Nat4Store

        return Nat4Store
    raise AttributeError(f"module 'nat4etl' has no attribute {name!r}")
