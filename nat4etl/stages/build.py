"""`build`: every stage in order inside one atomic publish."""

from __future__ import annotations

from pathlib import Path

from nat4etl.config import Settings
from nat4etl.stages import STAGES, run_stage
from nat4etl.store import open_for_write


def stages_for(settings: Settings) -> tuple[str, ...]:
    return tuple(s for s in STAGES if settings.wav or s != "align-wav")


def build(out: Path, settings: Settings, progress, *, wait_s: float = 0.0) -> dict:
    """Run all stages into a staging copy of ``out``; publish only if every stage succeeded."""
    summary = {}
    with open_for_write(out, wait_s=wait_s) as store:
        for name in stages_for(settings):
            progress.log(f"stage {name}: start")
            summary[name] = run_stage(store, name, settings, progress)
            progress.log(f"stage {name}: done")
    return summary
