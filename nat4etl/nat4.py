"""What nat4etl knows about NAT4 itself: file names, sound classes and unit ids.

Readers in ``formats/`` know the NEMS0 format and nothing of this; stages import it so the
dataset's conventions (``docs/nat4-dataset.md``) live in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Subset = Literal["est", "val", "other"]

AREAS = ("A1", "PEG")
#: the Zenodo file holding the source sounds, shared by both areas
WAV_ZIP = "wav.zip"
STIM_PREFIX = "STIM_"
PRESTIM = "PreStimSilence"
POSTSTIM = "PostStimSilence"

_VAL_RE = re.compile(r"^STIM_00cat")
_EST_RE = re.compile(r"^STIM_cat")
#: ``<site>-<electrode>-<unit>``; site = 3-letter animal + digits + optional session letter
_UNIT_RE = re.compile(r"^(?P<site>(?P<animal>[A-Za-z]{3})\d+[A-Za-z]?)-(?P<el>\d+)-(?P<unit>\d+)$")
_SITE_RE = re.compile(r"^[A-Za-z]{3}\d+[A-Za-z]?")
#: a recording name starts with a site only if the session letter is there (``NAT4_`` is not)
_RECORDING_SITE_RE = re.compile(r"^[A-Za-z]{3}\d+[A-Za-z]")
#: ``<AREA>_<SITE>_<hex>.tgz``, the per-site file names inside ``<AREA>_single_sites.zip``
_SITE_FILE_RE = re.compile(
    r"^(?:[A-Za-z0-9]+)_(?P<site>[A-Za-z]{3}\d+[A-Za-z]?)_[0-9a-fA-F]+\.tgz$"
)


@dataclass(frozen=True)
class AreaFiles:
    """The Zenodo file names of one area."""

    population: str
    single_sites: str
    pred_correlation: str

    @property
    def names(self) -> tuple[str, str, str]:
        return (self.population, self.single_sites, self.pred_correlation)


def area_files(area: str) -> AreaFiles:
    """File names as published on Zenodo (``nat4-dataset.md``, "The record")."""
    return AreaFiles(
        population=f"{area}_NAT4_ozgf.fs100.ch18.tgz",
        single_sites=f"{area}_single_sites.zip",
        pred_correlation=f"{area}_pred_correlation.csv",
    )


#: every file of the Zenodo record, in the record's order
ZENODO_FILES = (
    *(name for area in AREAS for name in area_files(area).names),
    WAV_ZIP,
)


def is_stim(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(STIM_PREFIX)


def stim_subset(name: str) -> Subset:
    """``val`` for ``^STIM_00cat``, ``est`` for ``^STIM_cat``, else ``other`` (reported)."""
    if _VAL_RE.match(name):
        return "val"
    if _EST_RE.match(name):
        return "est"
    return "other"


def wav_name(stim_name: str) -> str:
    """The expected file in ``wav.zip``: the epoch name without ``STIM_``."""
    return stim_name[len(STIM_PREFIX) :] if stim_name.startswith(STIM_PREFIX) else stim_name


@dataclass(frozen=True)
class UnitId:
    """A parsed ``<site>-<electrode>-<unit>`` id; numbers as ints so ``012`` == ``12``."""

    site: str
    animal: str
    electrode: int
    unit: int

    @property
    def key(self) -> tuple[str, int, int]:
        """What two files must agree on to name the same unit (TNC ids pad electrodes)."""
        return (self.site, self.electrode, self.unit)


def parse_unit_id(unit_id: str) -> UnitId | None:
    """None when the id does not follow the NAT4 convention (the caller reports it)."""
    m = _UNIT_RE.match(unit_id.strip()) if isinstance(unit_id, str) else None
    if m is None:
        return None
    return UnitId(m["site"], m["animal"], int(m["el"]), int(m["unit"]))


def canonical_unit_key(unit_id: str) -> tuple[str, int, int] | None:
    parsed = parse_unit_id(unit_id)
    return parsed.key if parsed else None


def site_of_unit(unit_id: str) -> str | None:
    """The site part of a unit id, even when electrode/unit do not parse."""
    parsed = parse_unit_id(unit_id)
    if parsed is not None:
        return parsed.site
    head = unit_id.split("-", 1)[0] if isinstance(unit_id, str) else ""
    return head if _SITE_RE.fullmatch(head) else None


def site_from_recording_name(name: str) -> str | None:
    """The leading ``ARM029a``-like token of a recording name, if it has one."""
    m = _RECORDING_SITE_RE.match(name or "")
    if m is None:
        return None
    rest = name[m.end() :]
    return m.group(0) if rest == "" or not rest[0].isalnum() else None


def site_from_file_name(file_name: str) -> str | None:
    """Only to name a file in messages; the site id proper comes from inside the archive."""
    m = _SITE_FILE_RE.match(file_name.rsplit("/", 1)[-1])
    return m["site"] if m else None
