"""PointProcess / TiledSignal HDF5: sorted keys, groups, links, garbage."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
from nems0_build import h5_bytes

from nat4etl.errors import FormatError
from nat4etl.formats.nems0_h5 import read_h5_datasets, read_point_process, read_tiled


def h5_with(build) -> bytes:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        build(h5)
    return buf.getvalue()


def test_point_process_keys_in_code_point_order():
    spikes = {"b": [0.2, 0.1], "B": [0.3], "a": [], "\u00e9": [1.0], "A-10": [0.5], "A-9": [0.4]}
    got = read_point_process(h5_bytes(spikes))
    assert list(got) == sorted(spikes) == ["A-10", "A-9", "B", "a", "b", "\u00e9"]
    assert got["b"].tolist() == [0.2, 0.1] and got["a"].shape == (0,)
    assert all(v.dtype == np.float64 for v in got.values())


def test_reads_file_objects_and_paths(tmp_path):
    data = h5_bytes({"c": [1.0, 2.0]})
    path = tmp_path / "x.h5"
    path.write_bytes(data)
    for source in (data, io.BytesIO(data), path, str(path)):
        assert read_point_process(source)["c"].tolist() == [1.0, 2.0]


def test_tiled_shapes():
    tiles = {"STIM_b": np.ones((2, 3)), "STIM_a": np.zeros((2, 5))}
    got = read_tiled(h5_bytes(tiles))
    assert list(got) == ["STIM_a", "STIM_b"] and got["STIM_a"].shape == (2, 5)
    with pytest.raises(FormatError, match="channels"):
        read_tiled(h5_bytes({"a": np.ones((2, 3)), "b": np.ones((3, 3))}))
    with pytest.raises(FormatError, match="2-D"):
        read_tiled(h5_bytes({"a": np.ones(3)}))


def test_group_where_a_dataset_is_expected():
    data = h5_with(lambda h5: h5.create_dataset("cell/with/slash", data=[1.0]))
    with pytest.raises(FormatError) as info:
        read_point_process(data, path="/d/site.tgz", member="R/R.resp.h5")
    assert str(info.value).startswith("site.tgz:R/R.resp.h5: 'cell' is a group")


def test_links_refused():
    def build(h5):
        h5.create_dataset("a", data=[1.0])
        h5["soft"] = h5py.SoftLink("/a")
        h5["ext"] = h5py.ExternalLink("/etc/other.h5", "/x")

    with pytest.raises(FormatError, match="Link, expected a dataset"):
        read_h5_datasets(h5_with(build))


def test_non_numeric_and_scalar_datasets():
    with pytest.raises(FormatError, match="dtype"):
        read_h5_datasets(h5_with(lambda h5: h5.create_dataset("s", data="text")))
    with pytest.raises(FormatError, match="1-D"):
        read_point_process(h5_with(lambda h5: h5.create_dataset("s", data=1.0)))


def test_size_bound_checked_before_reading():
    data = h5_with(
        lambda h5: h5.create_dataset("z", shape=(1000, 1000), dtype="f8", compression="gzip")
    )
    with pytest.raises(FormatError, match="limit"):
        read_h5_datasets(data, max_bytes=1 << 20)


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x89HDF\r\n\x1a\n" + bytes(100)])
def test_garbage(data):
    with pytest.raises(FormatError, match="not a readable HDF5"):
        read_point_process(data, member="R/R.resp.h5")


def test_truncated_hdf5():
    data = h5_bytes({f"c{i}": np.arange(100.0) for i in range(20)})
    for cut in (len(data) // 4, len(data) // 2, len(data) - 100):
        with pytest.raises(FormatError):
            read_point_process(data[:cut])
