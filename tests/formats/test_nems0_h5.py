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


# ============================================================================ direct inflate
def _vector_layouts():
    rng = np.random.default_rng(1)
    times = np.sort(rng.uniform(0, 3000, 5000))
    return {
        # (h5py create_dataset keywords, read without libhdf5's chunk pipeline?)
        "gzip, auto chunks": ({"data": times, "compression": "gzip"}, True),
        "gzip 9, partial last chunk": (
            {"data": times, "compression": "gzip", "compression_opts": 9, "chunks": (333,)},
            True,
        ),
        "float32": ({"data": times.astype(np.float32), "compression": "gzip"}, True),
        "big-endian": ({"data": times.astype(">f8"), "compression": "gzip"}, True),
        "int64": ({"data": np.arange(4000), "compression": "gzip", "chunks": (512,)}, True),
        "one element": ({"data": times[:1], "compression": "gzip"}, True),
        "shuffle": ({"data": times, "compression": "gzip", "shuffle": True}, False),
        "fletcher32": ({"data": times, "compression": "gzip", "fletcher32": True}, False),
        "lzf": ({"data": times, "compression": "lzf"}, False),
        "contiguous": ({"data": times}, False),
        "chunked, no filter": ({"data": times, "chunks": (1000,)}, False),
    }


@pytest.mark.parametrize("layout", list(_vector_layouts()))
def test_deflated_vectors_inflated_directly_equal_libhdf5(layout):
    from nat4etl.formats import nems0_h5

    kwargs, direct = _vector_layouts()[layout]
    data = h5_with(lambda h5: h5.create_dataset("u1", **kwargs))
    got = read_h5_datasets(data)["u1"]
    with h5py.File(io.BytesIO(data), "r") as h5:
        want = np.asarray(h5["u1"][()], np.float64)
        out = np.full(len(want) + 4, np.nan)
        plan = nems0_h5._plan_deflated_vector(h5["u1"], memoryview(data), out[2:-2])
        done = nems0_h5._inflate_plans({0: plan} if plan else {})
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float64
    assert (plan is not None) == direct
    if direct:  # at its place: nothing before or after it touched (a partial last chunk)
        assert done == {0}
        np.testing.assert_array_equal(out[2:-2], want)
        assert np.isnan(out[:2]).all() and np.isnan(out[-2:]).all()


def test_many_chunks_inflate_on_two_threads_and_a_bad_one_goes_to_libhdf5():
    """Past _SPLIT_CHUNKS the chunks are inflated half on a second thread; a dataset with a
    chunk the direct route refuses is read through libhdf5, which names the damage."""
    from nat4etl.formats import nems0_h5

    rng = np.random.default_rng(7)
    units = {f"u{i:02d}": np.sort(rng.uniform(0, 100, 900)) for i in range(20)}

    def build(h5):
        for key, times in units.items():
            h5.create_dataset(key, data=times, compression="gzip", chunks=(64,))

    data = bytearray(h5_with(build))
    with h5py.File(io.BytesIO(bytes(data)), "r") as h5:
        n_chunks = sum(len(range(0, 900, 64)) for _ in units)
        assert n_chunks >= 2 * nems0_h5._SPLIT_CHUNKS
        chunks = []
        h5["u17"].id.chunk_iter(lambda info: chunks.append((info.byte_offset, info.size)))
    got = read_h5_datasets(bytes(data))
    for key, want in units.items():
        np.testing.assert_array_equal(got[key], want)
    offset, size = chunks[3]  # in the second thread's half
    data[offset + 2 : offset + size] = bytes(size - 2)
    with pytest.raises(FormatError, match="unreadable HDF5"):
        read_point_process(bytes(data), member="R/R.resp.h5")


def test_unwritten_chunks_read_as_the_fill_value():
    def build(h5):
        ds = h5.create_dataset(
            "u1", shape=(3000,), dtype="f8", chunks=(500,), compression="gzip", fillvalue=-1.0
        )
        ds[:700] = np.arange(700.0)  # chunks 2..5 never written

    got = read_h5_datasets(h5_with(build))["u1"]
    np.testing.assert_array_equal(got[:700], np.arange(700.0))
    assert np.all(got[700:] == -1.0)


def test_a_chunk_past_the_dataset_end_does_not_stand_in_for_an_unwritten_one():
    """A damaged file whose dataspace is shorter than its chunk index: a chunk past the end
    must not count as one of the dataset's, or the unwritten chunk it stands in for would
    be left as whatever the buffer held, where libhdf5 reads the fill value."""

    def build(h5):
        ds = h5.create_dataset(
            "u1", shape=(10_000,), dtype="f8", chunks=(1024,), compression="gzip"
        )
        ds[:4096] = np.arange(1.0, 4097.0)  # chunks 0-3
        ds[5120:6144] = 1.0  # chunk 5; chunk 4 never written

    data = bytearray(h5_with(build))
    dims = np.int64(10_000).tobytes()
    at = data.find(dims)  # the dataspace message's size, first in the object header
    data[at : at + 8] = np.int64(4500).tobytes()  # 5 chunks: 0-4; chunk 5 is past the end
    with h5py.File(io.BytesIO(bytes(data)), "r") as h5:
        want = np.asarray(h5["u1"][()], np.float64)
        offsets = []
        h5["u1"].id.chunk_iter(lambda info: offsets.append(info.chunk_offset[0]))
    assert want.shape == (4500,) and offsets == [0, 1024, 2048, 3072, 5120]
    np.testing.assert_array_equal(read_h5_datasets(bytes(data))["u1"], want)


def test_damaged_deflate_chunk_is_a_format_error():
    data = bytearray(
        h5_with(
            lambda h5: h5.create_dataset(
                "u1", data=np.arange(5000.0), compression="gzip", chunks=(1000,)
            )
        )
    )
    with h5py.File(io.BytesIO(bytes(data)), "r") as h5:
        chunks = []
        h5["u1"].id.chunk_iter(lambda info: chunks.append((info.byte_offset, info.size)))
    offset, size = chunks[2]
    data[offset + 2 : offset + size] = bytes(size - 2)  # keep the zlib header, zero the rest
    with pytest.raises(FormatError, match="unreadable HDF5"):
        read_point_process(bytes(data), member="R/R.resp.h5")


def test_datasets_are_views_back_to_back_in_one_buffer_whatever_their_route():
    """unpack takes a file's spike times as one list column without a copy: the datasets
    lie back to back in key order, and a partial last chunk's tail never shows in the next
    one (here read through libhdf5)."""
    rng = np.random.default_rng(3)
    a = np.sort(rng.uniform(0, 100, 1000))  # 333-value chunks: a tail of 332 past the end
    b = np.arange(5.0)  # contiguous: libhdf5's route, written after a's tail
    c = np.sort(rng.uniform(0, 100, 700)).astype(np.float32)  # inflated aside, converted
    d = np.sort(rng.uniform(0, 100, 150))

    def build(h5):
        h5.create_dataset("a", data=a, compression="gzip", chunks=(333,))
        h5.create_dataset("b", data=b)
        h5.create_dataset("c", data=c, compression="gzip", chunks=(64,))
        h5.create_dataset("d", data=d, compression="gzip", chunks=(64,))

    got = read_h5_datasets(h5_with(build))
    for key, want in zip("abcd", (a, b, c, d), strict=True):
        np.testing.assert_array_equal(got[key], np.asarray(want, np.float64))
    base = got["a"].base
    assert all(got[k].base is base for k in "abcd")
    addresses = [got[k].__array_interface__["data"][0] for k in "abcd"]
    sizes = [got[k].nbytes for k in "abcd"]
    assert [addresses[i] + sizes[i] for i in range(3)] == addresses[1:]


def _compact(h5, key: str, values: np.ndarray) -> None:
    """A compact dataset (data kept in the object header), as small arrays may be stored."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create_simple(values.shape)
    ds = h5py.h5d.create(h5.id, key.encode(), h5py.h5t.IEEE_F64LE, space, dcpl)
    ds.write(h5py.h5s.ALL, h5py.h5s.ALL, values)


@pytest.mark.parametrize(
    "file_options",
    [{}, {"track_order": True}, {"libver": "latest"}, {"libver": "earliest"}],
    ids=["default", "creation-order", "latest-format", "earliest-format"],
)
def test_storage_layouts_and_link_orders_other_writers_use(file_options):
    """Compact, scale-offset, resizable and big-endian datasets among 20 units (more than
    the 8 links a compact group holds, so newer formats index them densely); a file that
    tracks creation order still comes back in code-point order, as NEMS0 rasterizes."""
    rng = np.random.default_rng(5)
    units = {f"TNC015a-{i:02d}-1": np.sort(rng.uniform(0, 30, i * 7)) for i in range(20, 0, -1)}
    layouts = [
        {"compression": "gzip"},
        {"scaleoffset": 6},
        {"maxshape": (None,)},
        {"dtype": ">f8", "compression": "gzip"},
        "compact",
    ]

    def build(h5):
        for i, (key, times) in enumerate(units.items()):
            layout = layouts[i % len(layouts)]
            if layout == "compact":
                _compact(h5, key, times)
            else:
                h5.create_dataset(key, data=times, **layout)

    buf = io.BytesIO()
    with h5py.File(buf, "w", **file_options) as h5:
        build(h5)
    data = buf.getvalue()
    got = read_point_process(data, member="R/R.resp.h5")
    assert list(got) == sorted(units)
    with h5py.File(io.BytesIO(data), "r") as h5:
        for key in units:
            np.testing.assert_array_equal(got[key], np.asarray(h5[key][()], np.float64))
            assert got[key].dtype == np.float64


def test_a_forked_child_inflates_on_a_pool_of_its_own():
    """The second inflate thread is a module-level pool: a child forked after the parent
    used it must not send its chunks to a thread it does not have (it would wait forever)."""
    import multiprocessing
    import sys

    from nat4etl.formats import nems0_h5

    if "jax" in sys.modules:  # run after the DLPack tests: forking JAX's threads can deadlock
        pytest.skip("JAX is loaded in this process; the suite's own order runs this first")

    times = np.sort(np.random.default_rng(9).uniform(0, 100, 64 * 2 * nems0_h5._SPLIT_CHUNKS))
    data = h5_with(lambda h5: h5.create_dataset("u1", data=times, compression="gzip", chunks=(64,)))
    np.testing.assert_array_equal(read_h5_datasets(data)["u1"], times)  # the parent's pool
    assert nems0_h5._POOL is not None
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        sums = pool.apply_async(_sum_of_u1, (data,)).get(timeout=60)
    assert sums == times.sum()


def _sum_of_u1(data: bytes) -> float:
    return float(read_h5_datasets(data)["u1"].sum())


@pytest.mark.parametrize("n_units", [1, 20], ids=["one thread", "two threads"])
def test_a_chunk_that_inflates_past_its_size_is_refused_before_it_is_inflated_whole(n_units):
    """A crafted chunk can inflate to ~1000x its stored size (libhdf5 would inflate it
    whole too): the direct route stops one byte past the chunk and names the dataset."""
    import zlib

    rng = np.random.default_rng(11)

    def build(h5):
        for i in range(n_units):
            h5.create_dataset(
                f"u{i:02d}", data=rng.uniform(0, 100, 4096), compression="gzip", chunks=(1024,)
            )

    data = bytearray(h5_with(build))
    last = f"u{n_units - 1:02d}"
    with h5py.File(io.BytesIO(bytes(data)), "r") as h5:
        chunks = []
        h5[last].id.chunk_iter(lambda info: chunks.append((info.byte_offset, info.size)))
    offset, size = chunks[1]
    bomb = zlib.compress(bytes(4 << 20), 9)  # 4 MiB in ~4 kB
    assert len(bomb) <= size
    data[offset : offset + len(bomb)] = bomb
    with pytest.raises(FormatError, match=rf"dataset '{last}': a chunk inflates past its 8192"):
        read_point_process(bytes(data), member="R/R.resp.h5")
