"""<area>_pred_correlation.csv: cellid, sig_auditory bool, other columns carried through."""

from __future__ import annotations

import pyarrow as pa
import pytest

from nat4etl.errors import FormatError
from nat4etl.formats.pred_correlation import read_pred_correlation

TEXT = (
    b",cellid,r_test,r_floor,sig_auditory,site,n\n"
    b"0,ARM029a-01-1,0.41,0.05,True,ARM029a,3\n"
    b"1,TNC015a-012-1,0.12,,False,TNC015a,4\n"
    b"2,NA,0.3,0.1,True,NULL,5\n"
)


def test_types_and_columns_carried_through(tmp_path):
    path = tmp_path / "A1_pred_correlation.csv"
    path.write_bytes(TEXT)
    for source in (TEXT, path):
        table = read_pred_correlation(source)
        assert table.column_names == ["cellid", "r_test", "r_floor", "sig_auditory", "site", "n"]
        assert table.schema.field("cellid").type == pa.string()
        assert table.schema.field("sig_auditory").type == pa.bool_()
        assert table.schema.field("r_test").type == pa.float64()
        assert table.schema.field("n").type == pa.int64()
        d = table.to_pydict()
        assert d["cellid"] == ["ARM029a-01-1", "TNC015a-012-1", "NA"]
        assert d["sig_auditory"] == [True, False, True]
        assert d["r_floor"][1] is None and d["site"][2] == "NULL"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"unit,sig_auditory\nA,True\n", "'cellid' missing"),
        # the unit's auditory flag is one of the two columns known to be there
        (b"cellid,r_test\nA,0.5\n", r"'sig_auditory' missing; header is \['cellid', 'r_test'\]"),
        (b"cellid,sig_auditory\nA,maybe\n", "unreadable CSV"),
        (b"cellid,sig_auditory\n,True\n", "empty cellid"),
        (b"", "unreadable CSV"),
        (b"cellid,x\nA,1,2\n", "unreadable CSV"),
        (b"cellid,x\nA,1\nB,2\nA,1\n", r"cellid 'A' occurs on lines 2, 4: one row per unit"),
        (b"cellid,x\nA,1\nB,2\nA,1\nB,3\n", r"lines 2, 4 \(1 more repeated\)"),
        # the file's lines: a blank line is skipped, a quoted field may hold a line end
        (b"cellid,x\nA,1\n\nB,2\nA,1\n", r"cellid 'A' occurs on lines 2, 5:"),
        (b'cellid,x\nB,"a\nb"\nA,1\r\nA,2\n', r"cellid 'A' occurs on lines 4, 5:"),
    ],
)
def test_errors(text, match):
    with pytest.raises(FormatError, match=match) as info:
        read_pred_correlation(text, path="/d/A1_pred_correlation.csv")
    assert str(info.value).startswith("A1_pred_correlation.csv: ")
    assert "\n" not in str(info.value)
