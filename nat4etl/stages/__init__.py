"""NAT4 interpretation, one module per CLI stage.

Each stage module defines ``run(store, settings, progress) -> dict`` (a summary) and keeps
its real work in pure functions from tables/files to tables; ``run`` only loads and saves
through :class:`nat4etl.store.Store`.

What each stage reads, writes and depends on is declared here, in :data:`CONTRACTS`, not
in the stage modules: `build` decides what is up to date from these alone, so a no-op build
never imports numpy, h5py or pyarrow.

Each stage names the Zenodo files it reads, not all of raw/: unpack an area's three files,
align-wav ``wav.zip``, and parse-epochs, which checks the sounds' names against the wav
files', only ``wav.zip``'s member list (``lists``). So adding waveforms to a ``--no-wav``
store (``build --wav``) reruns fetch, parse-epochs and align-wav, not unpack and what it
feeds. A table's provenance names the files it is made from: of its area (of each area
sharing it), its stage's reads and those of the stages whose tables it reads, not
``lists`` (``fingerprint.source_reads``). So parse-epochs rewrites ``stims``, ``cells``
and ``trials`` byte for byte, rebin-sites stays up to date, and the store is the one a
fresh ``build --wav`` writes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from nat4etl.errors import NotImplementedYet
from nat4etl.fingerprint import StageSpec
from nat4etl.nat4 import WAV_ZIP, area_files

#: CLI names, in build order
STAGES = ("fetch", "unpack", "parse-epochs", "rebin-sites", "align-wav", "normalize")

#: reads: Zenodo files ("raw/<glob>", "{area}" for each area built) and/or tables; lists:
#: Zenodo archives whose member names only are read; writes: tables ("raw" for fetch);
#: params: Settings fields the output depends on (all part of the stage's fingerprint)
CONTRACTS: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            "fetch", reads=(), writes=("raw",), params=("record_id", "zenodo_url", "areas", "wav")
        ),
        StageSpec(
            "unpack",
            reads=tuple(f"raw/{name}" for name in area_files("{area}").names),
            writes=(
                "recordings",
                "signals",
                "pop_signals",
                "site_spikes",
                "epochs",
                "pred_correlation",
                "source_members",
            ),
            params=("areas",),  # a --source mirror: its files' md5s are inputs, not its path
        ),
        StageSpec(
            "parse-epochs",
            reads=(
                "recordings",
                "signals",
                "pop_signals",  # row 0 of mask_est, a check on the sounds' est/val names
                "epochs",
                "site_spikes",
                "pred_correlation",
                "source_members",
            ),
            writes=("stims", "cells", "trials", "report"),
            params=("areas",),
            lists=(f"raw/{WAV_ZIP}",),  # the report's wav name checks
        ),
        StageSpec(
            "rebin-sites",
            reads=(
                "recordings",
                "signals",
                "epochs",  # the last epoch end: a spike before 0 counts from there
                "stims",
                "cells",
                "trials",
                "site_spikes",
                "pop_signals",
            ),
            writes=("responses", "val_means", "qc_val", "spectrograms"),
            params=("areas", "dt_ms"),
        ),
        StageSpec(
            "align-wav",
            reads=(f"raw/{WAV_ZIP}", "stims"),
            writes=("waveforms",),
            params=("areas", "dt_ms", "audio_fs_hz"),
        ),
        StageSpec(
            "normalize",
            reads=("recordings", "signals", "stims", "pop_signals", "responses", "spectrograms"),
            writes=("norm_constants",),
            params=("areas", "dt_ms", "norm"),
        ),
    )
}


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
