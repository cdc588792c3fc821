"""Write tables behind the stage's back: Parquet encoding overlaps the next decoding step.

A stage alternates decoding (numpy, h5py, inflate) with ``store.write_table`` (Parquet
encoding in C++, which releases the GIL). Done in turn, one of the machine's two cores idles
through each; :class:`WriteBehind` hands the writes to one worker thread instead, so the
caller decodes the next area while the last one is encoded and written.

Files stay byte-identical to a sequential build (each table is written whole by the same
``write_table``, one at a time, in submission order), and a stage still returns only after
every write has finished or failed: leaving the ``with`` block waits for them and raises
the first error, so the build records and publishes only complete files.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class WriteBehind:
    """``store.write_table`` on one worker thread, at most ``max_pending`` tables queued.

    ``submit`` blocks while ``max_pending`` writes are unfinished, so memory holds no more
    than that many tables the caller has already let go of.
    """

    def __init__(self, store, *, max_pending: int = 2):
        self.store = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nat4etl-write")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []

    def submit(self, name: str, table, **kwargs: Any) -> Future:
        """Queue ``store.write_table(name, table, **kwargs)``; its TableInfo comes later."""
        return self._queue(self.store.write_table, name, table, **kwargs)

    def link(self, name: str, *, from_area: str, area: str) -> Future:
        """Queue ``store.link_table``: after the writes queued before it, so ``from_area``'s
        files exist by then."""
        return self._queue(self.store.link_table, name, from_area=from_area, area=area)

    def _queue(self, fn, *args: Any, **kwargs: Any) -> Future:
        self._raise_failed()
        self._slots.acquire()
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)
        return future

    def wait(self) -> None:
        """Block until every queued write is done; raise the first failure."""
        for future in self._futures:
            future.exception()  # wait without raising yet: the first failure wins below
        self._raise_failed()

    def _raise_failed(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            # On an error in the block, queued writes are dropped; a running one finishes
            # (the staging copy it writes into is discarded by the build).
            self._pool.shutdown(wait=True, cancel_futures=True)
