"""``<area>_pred_correlation.csv``: one row per unit, ``cellid`` and ``sig_auditory`` known.

Only those two columns are certain (nat4-dataset.md); every other column is carried
through with the type pyarrow infers. Row order is the file's, not the population's.
"""

from __future__ import annotations

import csv
import io
import os
import re
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from nat4etl.errors import FormatError

__all__ = ["read_pred_correlation"]

_UNNAMED = re.compile(r"^(|Unnamed: \d+)$")
_BOOL_TRUE = ["True", "true", "TRUE"]
_BOOL_FALSE = ["False", "false", "FALSE"]


def read_pred_correlation(
    source: bytes | BinaryIO | str | os.PathLike,
    *,
    path: str | os.PathLike | None = None,
    member: str | None = None,
) -> pa.Table:
    """Read the per-unit table: ``cellid`` string, ``sig_auditory`` bool, the rest inferred.

    An unnamed leading column (a pandas index) is dropped. Empty cells are null.

    Raises
    ------
    FormatError
        Not CSV, no ``cellid`` column, a ``cellid`` empty or repeated, no
        ``sig_auditory`` column, or one not True/False.
    """
    if path is None and isinstance(source, str | os.PathLike):
        path = source

    def bad(msg: str) -> FormatError:
        return FormatError(msg, path=path, member=member)

    data = _read_bytes(source, bad)
    try:  # pyarrow checks string cells but not header names: check everything here
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"not UTF-8 ({err.reason} at byte {err.start})") from err

    convert = pacsv.ConvertOptions(
        column_types={"cellid": pa.string(), "sig_auditory": pa.bool_()},
        true_values=_BOOL_TRUE,
        false_values=_BOOL_FALSE,
        strings_can_be_null=False,
    )
    try:
        table = pacsv.read_csv(io.BytesIO(data), convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as err:
        raise bad(f"unreadable CSV ({err})".replace("\n", " ")) from err
    names = table.column_names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # Parquet would take them, but no reader could select either column
        raise bad(f"repeated column names {dupes}; header is {names}")
    if len(names) > 1 and _UNNAMED.match(names[0]):
        table = table.drop_columns([names[0]])
    if "cellid" not in table.column_names:
        raise bad(f"column 'cellid' missing; header is {table.column_names}")
    cellid = table.column("cellid")
    if cellid.null_count or pc.any(pc.equal(cellid, "")).as_py():
        raise bad("empty cellid")
    counts = pc.value_counts(cellid)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):  # which row is the unit's? (the old loader silently took the last)
        ids = cellid.to_pylist()
        first = repeated[0].as_py()
        starts = _row_lines(data)
        if len(starts) != len(ids):  # not read as pyarrow read it: count rows from 2
            starts = list(range(2, len(ids) + 2))
        lines = [starts[i] for i, c in enumerate(ids) if c == first]
        raise bad(
            f"cellid {first!r} occurs on lines {', '.join(map(str, lines))}"
            + (f" ({len(repeated) - 1} more repeated)" if len(repeated) > 1 else "")
            + ": one row per unit expected"
        )
    if "sig_auditory" not in table.column_names:  # every unit's `auditory` was null, unsaid
        raise bad(f"column 'sig_auditory' missing; header is {table.column_names}")
    return table


def _row_lines(data: bytes) -> list[int]:
    """The line of the file each data row starts on (a blank line is no row, a quoted
    field may hold line ends), for messages."""
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    starts, line = [], 1
    for row in reader:
        if row:
            starts.append(line)
        line = reader.line_num + 1
    return starts[1:]  # the first is the header's


def _read_bytes(source: bytes | BinaryIO | str | os.PathLike, bad) -> bytes:
    """The whole file (tens of kB): small enough to check before parsing."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as fh:
                return fh.read()
        except OSError as err:
            raise bad(f"cannot read: {err.strerror or err}") from err
    return source.read()
