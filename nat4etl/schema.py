"""Every table's Arrow schema, key, sort order and units: the contract between stages.

Tables are partitioned by area (``<table>/area=A1/part-0.parquet``). The ``area`` column
is *not* stored inside the files: it comes from the hive partition path, so
``pl.scan_parquet(..., hive_partitioning=True)`` and :meth:`Store.read_table` both see it.
Schemas below therefore list the in-file columns; ``area`` is added on read.

Vectors (counts per bin, spectrogram frames, audio samples) are fixed-size lists of
float32 so a whole column converts to one contiguous numpy array without copying. Their
length depends on parameters (``dt_ms``, ``audio_fs_hz``), so a spec names them in
``vectors`` and :func:`validate` accepts any length. A table with ``vectors`` is also
written as an uncompressed Arrow IPC file beside its Parquet file (``part-0.arrow``, the
same rows, schema and metadata: :data:`nat4etl.store.SIDECAR`), which the reader
memory-maps so that these columns reach numpy without being decoded or copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from nat4etl import SCHEMA_VERSION  # noqa: F401  (re-exported; lives in the light package root)
from nat4etl.errors import SchemaError


@dataclass(frozen=True)
class TableSpec:
    name: str
    fields: tuple[pa.Field, ...]
    key: tuple[str, ...]
    doc: str
    units: dict[str, str] = field(default_factory=dict)
    #: fixed-size float32 vector columns (length set by the data)
    vectors: tuple[str, ...] = ()
    #: extra columns beyond ``fields`` are allowed (carried-through CSV columns)
    open_columns: bool = False
    #: Parquet codec of the columns where zstd (every other column's) costs more CPU than
    #: the bytes it saves are worth; measured per column, see each table
    codecs: dict[str, str] = field(default_factory=dict)
    #: column -> {value: what it means}, for a column whose values are a fixed vocabulary
    values: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(list(self.fields))

    @property
    def column_names(self) -> list[str]:
        return [f.name for f in self.fields]


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_VEC = pa.list_(pa.float32())  # stands for fixed_size_list<float32>[n], see `vectors`

TABLES: dict[str, TableSpec] = {}


def _table(spec: TableSpec) -> TableSpec:
    TABLES[spec.name] = spec
    return spec


# --------------------------------------------------------------------------- raw (unpack)
RECORDINGS = _table(
    TableSpec(
        "recordings",
        (
            _f("recording", pa.string()),
            _f("kind", pa.string()),  # population | site
            _f("site", pa.string(), True),
            _f("file", pa.string()),  # Zenodo file name
            _f("member", pa.string(), True),  # member of the zip holding the site tgz
            _f("meta_json", pa.string(), True),
            _f("skipped_members", pa.list_(pa.string())),
        ),
        key=("recording",),
        doc=(
            "One row per NEMS0 recording found in the archives, with its meta.json as read "
            "(arrays in NumpyEncoder form: a list, or base64 where JSON has no list form, "
            "as for complex, datetime or bytes arrays)."
        ),
    )
)

SIGNALS = _table(
    TableSpec(
        "signals",
        (
            _f("recording", pa.string()),
            _f("signal", pa.string()),
            _f("signal_type", pa.string()),  # rasterized | point_process | tiled
            _f("fs_hz", pa.float64()),
            _f("n_chans", pa.int32()),
            _f("n_samples", pa.int64(), True),
            _f("chans", pa.list_(pa.string()), True),
            _f("segments_json", pa.string(), True),
            _f("meta_json", pa.string(), True),
        ),
        key=("recording", "signal"),
        doc="Signal sidecar JSON of every signal (fs, chans, segments), in file units.",
        units={"fs_hz": "Hz", "n_samples": "samples"},
    )
)

POP_SIGNALS = _table(
    TableSpec(
        "pop_signals",
        (
            _f("signal", pa.string()),
            _f("channel", pa.int32()),
            _f("chan", pa.string(), True),
            _f("min_value", pa.float32()),
            _f("max_value", pa.float32()),
            _f("values", pa.list_(pa.float32())),
        ),
        key=("signal", "channel"),
        doc="Population recording's rasterized signals (resp, stim, mask_est), one row per "
        "channel, every sample as float32. min_value/max_value: the channel's extremes, NaN "
        "ignored (NaN when it has no other value), so its range is known without decoding "
        "values.",
        units={
            "values": "signal units at the signal's fs_hz",
            "min_value": "signal units",
            "max_value": "signal units",
        },
        # A1's 294 MB of samples: zstd 18 MB for 0.8-1.1 s of CPU, lz4 34 MB for 0.5 s (no
        # compression 0.45 s); it is written while unpack parses on both cores
        codecs={"values": "lz4"},
    )
)

SITE_SPIKES = _table(
    TableSpec(
        "site_spikes",
        (
            _f("site", pa.string()),
            _f("recording", pa.string()),
            _f("signal", pa.string()),
            _f("unit_id", pa.string()),
            _f("spike_times_s", pa.list_(pa.float64())),
        ),
        key=("site", "unit_id"),
        doc="Per-site PointProcess spike times, unit ids as written in the site file.",
        units={"spike_times_s": "s"},
        # float64 times have random low bits: zstd made A1's 83 MB 77 MB for 0.1 s of CPU
        codecs={"spike_times_s": "none"},
    )
)

EPOCHS = _table(
    TableSpec(
        "epochs",
        (
            _f("recording", pa.string()),
            _f("signal", pa.string()),
            _f("row", pa.int32()),
            _f("name", pa.string(), True),
            _f("start_s", pa.float64(), True),
            _f("end_s", pa.float64(), True),
            _f("extra_json", pa.string(), True),
        ),
        key=("recording", "signal", "row"),
        doc="Every epoch of every signal of every recording, in file row order; columns "
        "other than name/start/end kept as a JSON object.",
        units={"start_s": "s", "end_s": "s"},
    )
)

PRED_CORRELATION = _table(
    TableSpec(
        "pred_correlation",
        (_f("cellid", pa.string()),),
        key=("cellid",),
        doc="<area>_pred_correlation.csv as read: cellid and every other column, in file "
        "types (its area column as pred_area: area is the partition column), so "
        "parse-epochs reads tables only.",
        open_columns=True,
    )
)

SOURCE_MEMBERS = _table(
    TableSpec(
        "source_members",
        (
            _f("file", pa.string()),  # Zenodo file name
            _f("member", pa.string()),
            _f("kind", pa.string()),  # recording | skipped
            _f("size_bytes", pa.int64()),
        ),
        key=("file", "member"),
        doc="Members of the area's single-sites zip (per-site tgz, skipped stray members "
        "such as __MACOSX/), as listed by unpack. wav.zip is listed by parse-epochs, which "
        "checks the wav names against it, and not stored.",
        units={"size_bytes": "bytes"},
    )
)

# ----------------------------------------------------------------- interpreted (parse-epochs)
STIMS = _table(
    TableSpec(
        "stims",
        (
            _f("stim", pa.int32()),
            _f("name", pa.string()),
            _f("subset", pa.string()),  # est | val | other
            _f("wav_name", pa.string(), True),
            _f("duration_s", pa.float64()),
            _f("prestim_s", pa.float64()),
            _f("poststim_s", pa.float64()),
            _f("n_frames", pa.int32()),
            _f("pop_start_s", pa.float64()),
        ),
        key=("stim",),
        doc="Sounds: est, then val, then any unclassified (other) ones, each in order of first "
        "appearance in the population file. "
        "pop_start_s: where the first occurrence starts in the population's data (its time "
        "as written, unless the JSON segments make the data spans of that time).",
        units={"duration_s": "s", "prestim_s": "s", "poststim_s": "s", "pop_start_s": "s"},
    )
)

CELLS = _table(
    TableSpec(
        "cells",
        (
            _f("cell", pa.int32()),
            _f("cell_id", pa.string()),
            _f("site", pa.string(), True),
            _f("animal", pa.string(), True),
            _f("electrode", pa.int32(), True),
            _f("unit", pa.int32(), True),
            _f("auditory", pa.bool_(), True),
            _f("site_unit_id", pa.string(), True),
            _f("match", pa.string()),  # exact | canonical | none
            _f("n_val_trials", pa.int32()),
        ),
        key=("cell",),
        doc="Units in population channel order, joined with <area>_pred_correlation.csv "
        "(its other columns follow, area as pred_area) and with the per-site unit ids. site: "
        "the site whose file "
        "holds the unit's spikes, else the one its id names.",
        open_columns=True,
    )
)

TRIALS = _table(
    TableSpec(
        "trials",
        (
            _f("site", pa.string()),
            _f("stim", pa.int32()),
            _f("trial", pa.int32()),
            _f("order", pa.int32()),
            _f("start_s", pa.float64()),
            _f("end_s", pa.float64()),
        ),
        key=("site", "stim", "trial"),
        doc="Every presentation of every sound in every site file that NEMS0's extract_epoch "
        "returns (one starting before 0 on the sample grid, or overlapping an earlier one of "
        "the same sound, is left out and reported); trial = repetition index within the "
        "site (0-based, time order), order = index in the session. start_s/end_s: as "
        "written, unless a rasterized site resp's JSON segments make the data spans of the "
        "session's time (a PointProcess's are ignored, as NEMS0 ignores them): "
        "then the presentation's position in that data, as extract_epoch places it.",
        units={"start_s": "s", "end_s": "s"},
    )
)

#: Every kind of ``report`` row: "subject: meaning". parse-epochs writes all but
#: spikes_before_0, which `nat4etl report` lists from the responses metadata (parse-epochs
#: reads no spike times). `report --kind` takes these names.
REPORT_KINDS: dict[str, str] = {
    # units
    "unit_without_site_data": "cell_id: a population unit no site file has (no val trials)",
    "unit_id_unparsed": "cell_id: a population unit id not of the form `<site>-<electrode>-<unit>`",
    "unit_without_pred_correlation": "cell_id: a population unit without a pred_correlation "
    "row (`auditory` null)",
    "pred_correlation_unit_not_in_population": "cellid: a pred_correlation row without a "
    "population unit",
    "site_unit_not_in_population": "unit id: a site file's unit without a population unit",
    "site_unit_duplicate_id": "site/unit id: a second site file's copy of a matched unit id; "
    "not used",
    "site_without_population_units": "site: a site file none of whose units are in the population",
    "spikes_before_0": "site/unit id: spike times before 0, counted where NEMS0 counts them "
    "(from the responses metadata)",
    # sounds
    "stim_unclassified": "sound: a STIM_ epoch neither ^STIM_cat (est) nor ^STIM_00cat (val)",
    "stim_outside_segments": "sound: no population occurrence within the JSON segments; left out",
    "stim_epoch_time_not_finite": "population/sound or site/sound: a STIM_ epoch whose time is not "
    "finite; left out",
    "silence_missing": "sound: no PreStimSilence or PostStimSilence in its population epoch; "
    "taken as 0 s",
    "mask_est_disagrees": "sound (or mask_est): mask_est puts the sound in the other subset "
    "than its name; kept by name",
    "population_epoch_past_data": "sound: its population epoch runs past the data; NaN-padded",
    "wav_missing": "sound: no wav of its name in wav.zip",
    "wav_case_only_match": "sound: its wav matched only ignoring letter case",
    # site presentations
    "site_stim_not_in_population": "site/sound: a STIM_ epoch of a site file that the "
    "population recording lacks",
    "repetition_count": "site/sound: another number of repetitions than its subset has at "
    "most sites (0: a val sound the site never played)",
    "presentation_length": "site/sound@start_s: a presentation of another length than the "
    "sound's population epoch; cut or NaN-padded",
    "site_silence_length": "site/sound: presentations whose Pre/PostStimSilence differs from "
    "the population's",
    "presentation_outside_segments": "site/sound@start_s: outside the JSON segments; left out "
    "(extract_epoch's boundary_mode='exclude')",
    "presentation_before_recording": "site/sound@start_s: starts before the recording; left "
    "out (boundary_mode='exclude')",
    "overlapping_presentation": "site/sound@start_s: starts before the previous presentation "
    "ends; left out (fix_overlap='first')",
    "presentation_not_placed": "site/sound@start_s: extract_epoch's loop over the JSON "
    "segments ended before it; left out",
    # files
    "segments_applied": "recording/signal: JSON segments that restrict the data; applied",
    "segments_not_applied": "recording/signal: JSON segments NEMS0 does not load (not a "
    "rasterized signal) or that differ from the resp signal's",
    "skipped_member": "file:member (file:site tgz:member inside a site recording): an "
    "archive member not read, and why (OS litter, not a .tgz or .wav, a jackknife view, an "
    "empty file, a name NEMS0 does not read)",
}

REPORT = _table(
    TableSpec(
        "report",
        (
            _f("kind", pa.string()),
            _f("subject", pa.string()),
            _f("detail", pa.string()),
        ),
        key=("kind", "subject"),
        doc="Mismatches found while interpreting the data: unmatched units, sites and sounds, "
        "unit ids not of the form <site>-<electrode>-<unit> or in more than one site file, "
        "odd repetition counts (0 for a val sound a site "
        "never played), site presentations of another length than the sound's population "
        "epoch, site presentations whose Pre/PostStimSilence differs from the population's "
        "(per site), sounds without their Pre/PostStimSilence, sounds whose population epoch "
        "mask_est (row 0) puts in the other subset than their name, sounds whose population "
        "epoch runs past the population's data (NaN-padded), missing and case-only wav "
        "matches, unclassified STIM_ epochs, STIM_ epochs with a time that is not finite, "
        "site presentations left out as extract_epoch leaves them out, JSON segments "
        "(applied or not), archive members not read.",
        values={"kind": REPORT_KINDS},
    )
)

# ------------------------------------------------------------ analysis tables (issue 4)
RESPONSES = _table(
    TableSpec(
        "responses",
        (
            _f("stim", pa.int32()),
            _f("cell", pa.int32()),
            _f("trial", pa.int32()),
            _f("source", pa.string()),  # population | site
            _f("counts", _VEC),
        ),
        key=("stim", "cell", "trial"),
        doc="Spike counts per bin for each (stim, cell, trial); est from the population file "
        "(trial 0) at 10 ms, else from the site files (source says which), val single "
        "trials from the site files.",
        units={"counts": "spikes per bin (dt_ms in metadata)"},
        vectors=("counts",),
    )
)

VAL_MEANS = _table(
    TableSpec(
        "val_means",
        (
            _f("stim", pa.int32()),
            _f("cell", pa.int32()),
            _f("mean_counts", _VEC),
        ),
        key=("stim", "cell"),
        doc="The population file's val responses (already averaged over repetitions), "
        "summed to the bin width, or at the file's own 10 ms where the bin width is not a "
        "whole number of them (dt_ms in metadata).",
        units={"mean_counts": "spikes per bin"},
        vectors=("mean_counts",),
    )
)

QC_VAL = _table(
    TableSpec(
        "qc_val",
        (
            _f("site", pa.string()),
            _f("stim", pa.int32()),
            _f("n_cells", pa.int32()),
            _f("n_trials", pa.int32()),
            _f("max_abs_diff", pa.float64(), True),
            _f("mean_abs_diff", pa.float64(), True),
        ),
        key=("site", "stim"),
        doc="Per (site, val stim): mean of the site's single trials vs the population average.",
        units={"max_abs_diff": "spikes per bin", "mean_abs_diff": "spikes per bin"},
    )
)

SPECTROGRAMS = _table(
    TableSpec(
        "spectrograms",
        (
            _f("stim", pa.int32()),
            _f("values", _VEC),
        ),
        key=("stim",),
        doc="Raw population-file spectrogram of each sound, frames averaged to the bin width, "
        "flattened (F, T) row-major; empty, its metadata saying why, at a bin width that is "
        "not a whole number of its 10 ms frames.",
        units={"values": "ozgf spectrogram units"},
        vectors=("values",),
    )
)

WAVEFORMS = _table(
    TableSpec(
        "waveforms",
        (
            _f("stim", pa.int32()),
            _f("samples", _VEC),
        ),
        key=("stim",),
        doc="Mono source waveform placed in the trial window (n_bins * hop samples, both "
        "in the metadata: n_bins response bins of hop audio samples).",
        units={"samples": "full scale [-1, 1]"},
        vectors=("samples",),
    )
)

NORM_CONSTANTS = _table(
    TableSpec(
        "norm_constants",
        (
            _f("method", pa.string()),
            _f("signal", pa.string()),  # spectrogram | responses
            _f("channel", pa.int32()),  # band or cell; -1 = one global constant
            _f("offset", pa.float64()),  # log offset d in ln(1 + x/d); 0 = no log
            _f("min", pa.float64()),
            _f("max", pa.float64()),
        ),
        key=("method", "signal", "channel"),
        doc="Min-max normalization constants; normalized values are computed on read.",
    )
)


def spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(f"unknown table {name!r}; known: {', '.join(TABLES)}") from None


def validate(name: str, table: pa.Table) -> None:
    """Raise SchemaError unless ``table`` has the spec's columns and types (area excluded)."""
    s = spec(name)
    names = table.schema.names
    missing = [c for c in s.column_names if c not in names]
    if missing:
        raise SchemaError(f"table {name!r} lacks columns {missing}")
    if not s.open_columns:
        extra = [c for c in names if c not in s.column_names]
        if extra:
            raise SchemaError(f"table {name!r} has unexpected columns {extra}")
    for f in s.fields:
        got = table.schema.field(f.name).type
        if f.name in s.vectors:
            ok = pa.types.is_fixed_size_list(got) and got.value_type == pa.float32()
            want = "fixed_size_list<float32>"
        else:
            ok = got == f.type
            want = str(f.type)
        if not ok:
            raise SchemaError(f"table {name!r} column {f.name!r} is {got}, expected {want}")


def markdown() -> str:
    """The README's table reference, generated so the docs cannot drift from the code."""
    lines = []
    for s in TABLES.values():
        key = ", ".join(("area", *s.key))
        lines += [f"#### `{s.name}` (key: {key})", "", s.doc, ""]
        lines += ["| column | type | units |", "|---|---|---|"]
        lines.append("| `area` | string (partition) | |")
        for f in s.fields:
            typ = "fixed_size_list<float32>" if f.name in s.vectors else str(f.type)
            if f.nullable:
                typ += ", nullable"
            lines.append(f"| `{f.name}` | {typ} | {s.units.get(f.name, '')} |")
        if s.open_columns:
            lines.append("| *(more)* | carried through from the source CSV | |")
        lines.append("")
        for column, meanings in s.values.items():
            lines += [f"| `{column}` | subject | meaning |", "|---|---|---|"]
            for value, text in meanings.items():
                subject, _, meaning = text.partition(": ")
                lines.append(f"| `{value}` | {subject} | {meaning} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def update_readme(path: str) -> None:
    """Replace the generated block between the schema markers of ``path``."""
    import re

    with open(path) as f:
        text = f.read()
    pattern = r"(<!-- schema:begin[^\n]*-->\n).*?(<!-- schema:end -->)"
    text = re.sub(pattern, lambda m: m.group(1) + markdown() + m.group(2), text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 2:
        update_readme(sys.argv[1])
    else:
        print(markdown(), end="")
