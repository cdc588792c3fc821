"""NAT4 interpretation, one module per CLI stage.

Each stage module defines::

    READS: tuple[str, ...]    # "raw" and/or table names it reads
    WRITES: tuple[str, ...]   # table names it writes
    PARAMS: tuple[str, ...]   # Settings fields its output depends on (fingerprints)
    def run(store: Store, settings: Settings, progress: Progress) -> dict   # summary

and keeps its real work in pure functions from tables/files to tables; ``run`` only loads
and saves through :class:`nat4etl.store.Store`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from nat4etl.errors import NotImplementedYet

#: CLI names, in build order
STAGES = ("fetch", "unpack", "parse-epochs", "rebin-sites", "align-wav", "normalize")


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(name)
    try:
        module = importlib.import_module(f"nat4etl.stages.{name.replace('-', '_')}")
    except ModuleNotFoundError as err:
        if err.name != f"nat4etl.stages.{name.replace('-', '_')}":
            raise
        module = None
    if module is None or not hasattr(module, "run"):
        raise NotImplementedYet(f"stage `{name}` is not implemented yet; nothing was written")
    return module


def run_stage(store, name: str, settings, progress) -> dict:
    return stage_module(name).run(store, settings, progress) or {}
