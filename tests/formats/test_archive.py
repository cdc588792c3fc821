"""Safe archive iteration: formats, nesting, unsafe members, bombs, truncation."""

from __future__ import annotations

import functools
import gzip
import io
import os
import struct
import tarfile
import zipfile
import zlib

import pytest
from isal.isal_zlib import crc32_combine
from nems0_build import Unseekable, tar_bytes, zip_bytes

from nat4etl.errors import ArchiveError, MissingMember, UnsafeMember
from nat4etl.formats import archive
from nat4etl.formats.archive import Limits, extract_all, iter_members, open_member

MEMBERS = [("R/R.meta.json", b"{}"), ("R/R.resp.csv", b"1,2\n" * 1000), ("R/empty", b"")]


def contents(source, **kw) -> dict[str, bytes]:
    return {m.name: m.read() for m in iter_members(source, **kw)}


@pytest.mark.parametrize("gz", [True, False])
def test_tar_members_in_order_with_sizes(gz):
    data = tar_bytes(MEMBERS, gz=gz)
    members = list(iter_members(data, path="x.tgz"))
    assert [m.name for m in members] == [n for n, _ in MEMBERS]
    assert [m.size_bytes for m in members] == [len(d) for _, d in MEMBERS]
    assert members[1].basename == "R.resp.csv"


def test_tar_read_while_iterating_and_out_of_order():
    data = tar_bytes(MEMBERS)
    members = []
    for member in iter_members(data):
        members.append(member)
        with member.open() as f:
            assert f.read(2) == dict(MEMBERS)[member.name][:2]
    assert contents(data) == dict(MEMBERS)


def test_tar_from_path_and_unseekable_stream(tmp_path):
    data = tar_bytes(MEMBERS)
    path = tmp_path / "r.tgz"
    path.write_bytes(data)
    assert contents(path) == dict(MEMBERS)
    assert contents(str(path)) == dict(MEMBERS)

    class Pipe(io.RawIOBase):
        def __init__(self):
            self._b = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self._b.readinto(b)

    assert contents(io.BufferedReader(Pipe())) == dict(MEMBERS)


@pytest.mark.parametrize(
    "make", [lambda m: tar_bytes(m), lambda m: tar_bytes(m, gz=False), zip_bytes]
)
def test_members_open_after_iteration_when_source_reopens(make, tmp_path):
    data = make(MEMBERS)
    path = tmp_path / "a.bin"
    path.write_bytes(data)
    for source in (data, path):
        members = list(iter_members(source))
        assert [m.read() for m in reversed(members)] == [d for _, d in reversed(MEMBERS)]


def test_members_of_a_stream_must_be_opened_while_iterating():
    members = list(iter_members(io.BytesIO(tar_bytes(MEMBERS)), path="s.tgz"))
    with pytest.raises(ArchiveError, match="while iterating"):
        members[1].read()


def test_zip_members_and_directories_skipped():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("d/", b"")
        for name, data in MEMBERS:
            zf.writestr(name, data)
    assert contents(buf.getvalue()) == dict(MEMBERS)


def test_tar_directories_skipped():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("R")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        info = tarfile.TarInfo("R/a")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert contents(buf.getvalue()) == {"R/a": b"x"}


def test_nested_tgz_in_zip_names_both_in_errors():
    inner = tar_bytes([("R/R.resp.json", b"{}"), ("../evil", b"x")])
    outer = zip_bytes([("sites/A1_R_abc.tgz", inner)])
    (member,) = iter_members(outer, path="/data/A1_single_sites.zip")
    names = []
    with pytest.raises(UnsafeMember) as info:
        for m in member.iter_archive():
            names.append((m.name, m.qualname))
    assert names == [("R/R.resp.json", "sites/A1_R_abc.tgz:R/R.resp.json")]
    assert str(info.value).startswith("A1_single_sites.zip:sites/A1_R_abc.tgz:../evil: ")


def test_open_member_and_missing_member():
    data = tar_bytes(MEMBERS)
    with open_member(data, "R/R.resp.csv", path="x.tgz") as f:
        assert f.read() == dict(MEMBERS)["R/R.resp.csv"]
    with pytest.raises(MissingMember, match=r"x.tgz:R/nope"):
        with open_member(data, "R/nope", path="x.tgz"):
            pass


# --- unsafe members ------------------------------------------------------------------------


def tar_with(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ok = tarfile.TarInfo("R/ok")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        info.size = len(data) if info.isreg() else 0
        tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def make_info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("info", "match"),
    [
        (make_info("../escape"), "'..'"),
        (make_info("R/../../escape"), "'..'"),
        (make_info("/etc/passwd"), "absolute"),
        (make_info("C:/windows"), "absolute"),
        (make_info("..\\escape"), "'..'"),
        (make_info("R/link", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
        (make_info("R/hard", tarfile.LNKTYPE, "R/ok"), "hard link"),
        (make_info("R/dev", tarfile.CHRTYPE), "device"),
        (make_info("R/blk", tarfile.BLKTYPE), "device"),
        (make_info("R/fifo", tarfile.FIFOTYPE), "fifo"),
    ],
)
def test_unsafe_tar_members_refused(info, match):
    data = tar_with(info, b"x")
    with pytest.raises(UnsafeMember, match=match) as err:
        list(iter_members(data, path="/tmp/bad.tgz"))
    assert str(err.value).startswith(f"bad.tgz:{info.name}: ")


def test_unsafe_zip_members_refused():
    with pytest.raises(UnsafeMember, match="'..'"):
        list(iter_members(zip_bytes([("a/../../x", b"1")])))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeMember, match="symlink"):
        list(iter_members(buf.getvalue()))


def test_extract_all_stays_inside(tmp_path):
    data = tar_bytes([("R/a.txt", b"a"), ("R/sub/b.txt", b"b")])
    written = extract_all(data, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "R/a.txt",
        "R/sub/b.txt",
    ]
    assert (tmp_path / "out/R/sub/b.txt").read_bytes() == b"b"
    assert not list((tmp_path / "out").rglob("*.part"))


def test_extract_all_refuses_symlinked_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "R")
    with pytest.raises(UnsafeMember, match="symlink"):
        extract_all(tar_bytes([("R/a.txt", b"a")]), out)
    assert not (tmp_path / "elsewhere/a.txt").exists()


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_extract_all_refuses_duplicates(tmp_path):
    with pytest.raises(ArchiveError, match="twice"):
        extract_all(zip_bytes([("a", b"1"), ("a", b"2")]), tmp_path)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_zip_listing_a_name_twice_is_refused_before_any_member():
    """Which of the two is meant? Iterating gave both (align-wav then placed whichever
    decoded last), a reader by name the last. Directories listed twice carry no data."""
    data = zip_bytes([("d/", b""), ("d/", b""), ("d/a", b"1"), ("d/b", b"2"), ("d/a", b"3")])
    members = iter_members(data, path="/x/sites.zip")
    with pytest.raises(ArchiveError, match="member appears twice") as info:
        next(members)
    assert str(info.value) == "sites.zip:d/a: member appears twice"


# --- bombs ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def zeros_bomb_tgz(size_bytes: int) -> bytes:
    """A tgz whose one member is ``size_bytes`` zeros, built without ever holding them:
    full-flushed deflate chunks are self-contained, so one compressed MiB is repeated."""
    mib = bytes(1 << 20)
    assert size_bytes % len(mib) == 0
    info = tarfile.TarInfo("R/R.resp.csv")
    info.size = size_bytes
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    end = bytes(tarfile.RECORDSIZE)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)
    chunk = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.compress(end) + comp.flush()
    crc = zlib.crc32(header)
    crc = crc32_combine(crc, crc32_of_zeros(size_bytes), size_bytes)
    crc = zlib.crc32(end, crc)
    total = len(header) + size_bytes + len(end)
    gz_head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, total & 0xFFFFFFFF)
    return gz_head + head + chunk * (size_bytes // len(mib)) + tail + trailer


def crc32_of_zeros(size_bytes: int) -> int:
    """crc32 of that many zeros by doubling: 2 GiB in microseconds, not a second."""
    mib = 1 << 20
    crc, length, block_crc, block = 0, 0, zlib.crc32(bytes(mib)), mib
    n = size_bytes // mib
    while n:
        if n & 1:
            crc = crc32_combine(crc, block_crc, block) if length else block_crc
            length += block
        block_crc = crc32_combine(block_crc, block_crc, block)
        block *= 2
        n >>= 1
    return crc


def test_zeros_tgz_helper_is_a_valid_archive():
    data = zeros_bomb_tgz(8 << 20)
    (member,) = iter_members(data)
    assert member.read() == bytes(8 << 20)
    assert crc32_of_zeros(6 << 20) == zlib.crc32(bytes(6 << 20))


def test_bomb_refused_by_declared_size_before_reading():
    data = zeros_bomb_tgz(2 << 30)  # a 2 GiB member, ~2 MB compressed
    with pytest.raises(UnsafeMember, match="over the 1073741824-byte limit") as err:
        list(iter_members(data, path="bomb.tgz", limits=Limits(max_member_bytes=1 << 30)))
    assert str(err.value).startswith("bomb.tgz:R/R.resp.csv: ")


def test_bomb_refused_by_ratio_while_reading():
    data = zeros_bomb_tgz(2 << 30)
    limits = Limits(max_ratio=100, ratio_floor_bytes=8 << 20)
    with pytest.raises(UnsafeMember, match="decompression bomb") as err:
        for member in iter_members(data, path="bomb.tgz", limits=limits):
            with member.open() as f:
                while f.read(1 << 20):
                    pass
    assert str(err.value).startswith("bomb.tgz:R/R.resp.csv: compression ratio")


def test_bomb_refused_by_ratio_while_skipping():
    data = zeros_bomb_tgz(2 << 30)
    limits = Limits(max_ratio=100, ratio_floor_bytes=8 << 20)
    with pytest.raises(UnsafeMember, match="decompression bomb"):
        list(iter_members(data, limits=limits))  # never opened: skipping inflates too


def test_total_limit_counts_every_member():
    data = tar_bytes([(f"R/{i}", bytes(1000)) for i in range(10)])
    with pytest.raises(UnsafeMember, match="limit"):
        list(iter_members(data, limits=Limits(max_total_bytes=5000)))


def test_zip_ratio_checked_from_the_directory():
    data = zip_bytes([("z", bytes(4 << 20))])
    with pytest.raises(UnsafeMember, match="ratio"):
        list(iter_members(data, limits=Limits(max_ratio=10, ratio_floor_bytes=1 << 20)))


# --- damaged archives ----------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_tar_is_an_archive_error(gz):
    data = tar_bytes(MEMBERS + [("R/R.stim.csv", b"3,4\n" * 5000)], gz=gz)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 700, len(data) - 5):
        if not gz and cut >= len(data) - 1024:
            continue  # inside the plain tar's zero padding: nothing is lost
        with pytest.raises(ArchiveError) as err:
            contents(data[:cut], path="/d/cut.tgz")
        assert str(err.value).startswith("cut.tgz")
        assert "\n" not in str(err.value)
        assert "truncated or corrupt archive" in str(err.value) or not gz


def test_truncated_at_member_boundary_in_plain_tar():
    data = tar_bytes([("R/a", b"x" * 512)], gz=False)
    with pytest.raises(ArchiveError, match="end-of-archive marker"):
        contents(data[:1024])


def test_corrupt_gzip_crc():
    data = bytearray(tar_bytes(MEMBERS))
    data[-8] ^= 0xFF
    with pytest.raises(ArchiveError):
        contents(bytes(data))


def test_garbled_tar_header_after_the_first():
    data = bytearray(tar_bytes([("R/a", b"x" * 10), ("R/b", b"y" * 10)], gz=False))
    data[1024 + 100 : 1024 + 108] = b"garbage!"  # checksum now wrong
    with pytest.raises(ArchiveError, match="bad tar header"):
        contents(bytes(data))


@pytest.mark.parametrize(
    "data", [b"", b"not an archive at all", b"\x1f\x8bgarbage", b"PK\x03\x04junk"]
)
def test_garbage_is_an_archive_error(data):
    with pytest.raises(ArchiveError):
        contents(data, path="junk.bin")


# Bytes after a complete gzip stream: gzip's reader takes them for a further member and
# fails while the tar's last member is being read, which is not where the damage is.
APPENDED = {
    "1 byte": b"x",
    "8 bytes": b"garbage!",  # under a gzip header's 10 bytes: isal says "ended before..."
    "long": bytes(range(256)) * 40,  # gzip says "Not a gzipped file"
    "a lone 1f": b"\x1f",  # Python's gzip: not gzip either
    "after zero padding": bytes(512) + b"junk",
    "gzip's magic, then not gzip": b"\x1f\x8bjunk after the magic",
    "gzip's magic and method, reserved flags": b"\x1f\x8b\x08\xe0" + bytes(20),
}


@pytest.mark.parametrize("tail", APPENDED.values(), ids=APPENDED.keys())
def test_bytes_appended_after_the_gzip_stream_are_named_as_such(tail):
    data = tar_bytes(MEMBERS + [("R/R.stim.csv", b"3,4\n" * 5000)])
    with pytest.raises(ArchiveError) as err:
        contents(data + tail, path="/d/x.tgz")
    n = len(tail)
    assert str(err.value) == (
        f"x.tgz: {n} byte{'s' * (n > 1)} after the end of its gzip data (at byte {len(data)}"
        f" of {len(data) + n}) {'are' if n > 1 else 'is'} not gzip:"
        " something was appended to the file"
    )
    assert err.value.member is None  # no member is damaged


def test_bytes_appended_after_two_gzip_members_or_in_a_nested_tgz():
    two = _gzip_members(tar_bytes(MEMBERS, gz=False))
    with pytest.raises(ArchiveError, match=rf"^x\.tgz: 8 bytes .*at byte {len(two)} of "):
        contents(two + b"garbage!", path="x.tgz")
    outer = zip_bytes([("sites/A1_R_abc.tgz", tar_bytes(MEMBERS) + b"garbage!")])
    (member,) = iter_members(outer, path="/data/A1_single_sites.zip")
    with pytest.raises(ArchiveError, match="something was appended") as err:
        list(member.iter_archive())
    assert str(err.value).startswith("A1_single_sites.zip:sites/A1_R_abc.tgz: 8 bytes after")


def test_bytes_appended_read_with_the_standard_gzip_module(monkeypatch):
    monkeypatch.setattr(archive, "_gzip", gzip)
    monkeypatch.setattr(archive, "_isal_zlib", None)
    data = tar_bytes(MEMBERS)
    with pytest.raises(ArchiveError, match=rf"^x\.tgz: 8 bytes .*at byte {len(data)} of "):
        contents(data + b"garbage!", path="x.tgz")


def test_damage_inside_the_gzip_stream_is_still_named_so_with_bytes_appended():
    data = tar_bytes(MEMBERS + [("R/R.stim.csv", b"3,4\n" * 5000)])
    for cut in (len(data) // 2, len(data) - 5):  # in the deflate data, in the trailer
        with pytest.raises(ArchiveError, match=r"^x\.tgz") as err:
            contents(data[:cut] + b"garbage!", path="x.tgz")
        assert "appended" not in str(err.value)
    bad_crc = bytearray(data + b"garbage!")
    bad_crc[len(data) - 8] ^= 0xFF
    with pytest.raises(ArchiveError, match=r"^x\.tgz.*(checksum|CRC|check)") as err:
        contents(bytes(bad_crc), path="x.tgz")
    assert "appended" not in str(err.value)


def test_truncated_zip():
    data = zip_bytes(MEMBERS)
    with pytest.raises(ArchiveError):
        contents(data[: len(data) - 30])


def test_missing_file_is_an_archive_error(tmp_path):
    with pytest.raises(ArchiveError, match="cannot open"):
        contents(tmp_path / "nope.tgz")


def test_isal_is_used_when_installed():
    pytest.importorskip("isal")
    assert archive._gzip.__name__ == "isal.igzip"
    # isal's reader itself, not GzipFile, whose readinto is read() plus a copy
    stream = archive._gunzipped(io.BytesIO(gzip.compress(b"x" * 10)))
    assert type(stream.raw).__name__ == "_GzipReader"
    assert stream.read() == b"x" * 10


def test_works_with_the_standard_gzip_module(monkeypatch):
    monkeypatch.setattr(archive, "_gzip", gzip)
    monkeypatch.setattr(archive, "_isal_zlib", None)
    assert isinstance(archive._gunzipped(io.BytesIO(gzip.compress(b""))), gzip.GzipFile)
    data = tar_bytes(MEMBERS)
    assert contents(data) == dict(MEMBERS)
    with pytest.raises(ArchiveError):
        contents(data[: len(data) // 2])


def test_directory_read_as_an_archive_of_its_files(tmp_path):
    root = tmp_path / "rec"
    for name, data in [*MEMBERS, ("R/sub/x.h5", b"\x89HDF"), ("top.json", b"[]")]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "R" / "emptydir").mkdir()
    want = {**dict(MEMBERS), "R/sub/x.h5": b"\x89HDF", "top.json": b"[]"}
    for source in (root, str(root)):
        members = list(iter_members(source))
        assert [m.name for m in members] == sorted(want)  # sorted, directories left out
        assert [m.size_bytes for m in members] == [len(want[m.name]) for m in members]
        assert {m.name: m.read() for m in members} == want  # opened after iteration
    with open_member(root, "R/R.resp.csv") as f:
        assert f.read(4) == b"1,2\n"


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_directory_with_a_symlink_is_refused(tmp_path, kind):
    root = tmp_path / "rec"
    root.mkdir()
    (root / "a.json").write_bytes(b"{}")
    target = tmp_path / "outside"
    target.mkdir() if kind == "dir" else target.write_bytes(b"secret")
    (root / "link").symlink_to(target)
    with pytest.raises(UnsafeMember, match="link: symlink refused"):
        contents(root, path="rec")


def test_directory_files_bounded_by_the_limits(tmp_path):
    (tmp_path / "big.csv").write_bytes(b"x" * 100)
    with pytest.raises(UnsafeMember, match="over the 50-byte limit"):
        contents(tmp_path, limits=Limits(max_member_bytes=50))


def _zip_of(members, method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data, compress_type=method)
    return buf.getvalue()


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_zip_members_of_every_method_read_whole(method):
    rng = __import__("numpy").random.default_rng(0)
    members = [
        ("empty", b""),
        ("noise", rng.bytes(3 << 20)),  # several reads of compressed bytes
        ("zeros", bytes(40 << 20)),  # inflates past one piece from one read
        ("text", b"0.000000000000000000e+00," * 1000),
    ]
    assert contents(_zip_of(members, method)) == dict(members)


def test_deflated_and_stored_zip_members_are_inflated_by_isal():
    pytest.importorskip("isal")
    data = _zip_of(MEMBERS)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            with archive._isal_member(zf, info) as stream:
                assert isinstance(stream, archive._IsalZipMember)
                assert stream.read() == dict(MEMBERS)[info.filename]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_member_whose_data_does_not_match_its_crc_names_it(method):
    payload = b"spike times " * 5000
    data = bytearray(_zip_of([("R/R.resp.h5", payload)], method))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("R/R.resp.h5")
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    if method == zipfile.ZIP_STORED:
        data[at] ^= 0x01  # still reads, but is not the data written
    else:
        # the CRC fields say other data: the inflate itself succeeds
        for off in (info.header_offset + 14, data.rindex(b"PK\x01\x02") + 16):
            data[off : off + 4] = struct.pack("<I", (info.CRC + 1) & 0xFFFFFFFF)
    with pytest.raises(ArchiveError, match=r"sites\.zip.*R/R\.resp\.h5.*CRC"):
        contents(bytes(data), path="sites.zip")


def test_zip_member_with_corrupt_deflate_data_is_an_archive_error():
    payload = bytes(range(256)) * 4000
    data = bytearray(_zip_of([("R/R.epoch.csv", payload)]))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("R/R.epoch.csv")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start : start + 8] = b"\xff" * 8  # an invalid block type
    with pytest.raises(ArchiveError, match=r"R/R\.epoch\.csv"):
        contents(bytes(data), path="sites.zip")


def _without_end_blocks(members) -> bytes:
    """A plain tar cut right after its last member's data: no end-of-archive blocks."""
    data = tar_bytes(members, gz=False)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
    return data[: last.offset_data + -(-last.size // 512) * 512]


def test_a_complete_gzip_stream_without_the_tar_end_blocks_reads_as_tarfile_does():
    import gzip

    members = [("R/R.meta.json", b"{}"), ("R/R.resp.csv", b"1,2\n" * 300)]
    plain = _without_end_blocks(members)
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(gzip.compress(plain)))] == [
        n for n, _ in members
    ]
    assert contents(gzip.compress(plain), path="x.tgz") == dict(members)
    with pytest.raises(ArchiveError, match="end-of-archive marker"):
        contents(plain, path="x.tar")  # plain: the marker is the only sign of a cut
    with pytest.raises(ArchiveError, match="x.tgz"):
        contents(gzip.compress(plain)[:-4], path="x.tgz")  # the gzip trailer is cut


# --- other writers' gzip, tar and zip framing -----------------------------------------------


def _gzip_with_every_header_field(data: bytes) -> bytes:
    """One gzip member with FEXTRA, FNAME, FCOMMENT and FHCRC set (RFC 1952; gzip(1)
    and tarfile write only FNAME)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    extra = b"AB\x02\x00hi"
    head = b"\x1f\x8b\x08\x1e" + struct.pack("<I", 0) + b"\x00\x03"
    head += struct.pack("<H", len(extra)) + extra + b"R.tar\x00" + b"a comment\x00"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    return head + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def _gzip_members(data: bytes) -> bytes:
    """The tar split across two gzip members (``cat a.gz b.gz``, pigz/bgzip-style)."""
    import gzip

    cut = len(data) // 3
    return gzip.compress(data[:cut]) + gzip.compress(data[cut:])


@pytest.mark.parametrize(
    "wrap",
    [
        _gzip_with_every_header_field,
        _gzip_members,
        lambda plain: __import__("gzip").compress(plain) + bytes(4096),  # padded to a block
    ],
    ids=["header-fields", "two-gzip-members", "zero-padded"],
)
def test_gzip_framing_of_other_writers(wrap):
    plain = tar_bytes(MEMBERS, gz=False)
    assert contents(wrap(plain), path="x.tgz") == dict(MEMBERS)


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
def test_tar_formats_and_a_pax_global_header(fmt):
    """GNU tar, bsdtar and ``git archive`` (a pax_global_header first) write these."""
    headers = {"comment": "git archive"} if fmt == tarfile.PAX_FORMAT else {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt, pax_headers=headers) as tf:
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size, info.uname, info.gname = len(data), "nems", "users"
            tf.addfile(info, io.BytesIO(data))
    assert contents(buf.getvalue(), path="x.tgz") == dict(MEMBERS)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip64_and_streamed_zip_with_data_descriptors(method):
    """Zip64 records (``force_zip64``; any member or archive past 4 GiB) and sizes in a
    data descriptor after each member (a zip written to a pipe)."""
    tgz = tar_bytes(MEMBERS)
    members = [("A1_single_sites/A1_TNC015a_ab.tgz", tgz), ("wav/x.wav", b"RIFF" * 300)]
    zip64 = io.BytesIO()
    with zipfile.ZipFile(zip64, "w", method) as zf:
        for name, data in members:
            with zf.open(name, "w", force_zip64=True) as f:
                f.write(data)
    streamed = Unseekable()
    with zipfile.ZipFile(streamed, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    for data in (zip64.getvalue(), bytes(streamed.data)):
        assert contents(data, path="sites.zip") == dict(members)
        (site,) = [m for m in iter_members(data, path="sites.zip") if m.name.endswith(".tgz")]
        assert contents(site.read()) == dict(MEMBERS)
    with zipfile.ZipFile(io.BytesIO(bytes(streamed.data))) as zf:
        assert all(i.flag_bits & 0x08 for i in zf.infolist())  # data descriptors indeed


def test_member_names_that_are_not_utf8_come_out_printable(tmp_path):
    """An old tar's Latin-1 name (or a directory's): tarfile and os.walk give its bytes as
    surrogates, which no message or Parquet string holds (unpack failed with a
    UnicodeEncodeError traceback); they come out as ``\\xNN`` and read as any member."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT, encoding="latin-1"
    ) as tf:
        for name, data in [("R/notes caf\u00e9.txt", b"abc"), *MEMBERS]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    shown = "R/notes caf\\xe9.txt"
    assert contents(data, path="x.tgz") == {shown: b"abc", **dict(MEMBERS)}
    members = list(iter_members(data, path="x.tgz"))
    assert members[0].read() == b"abc"  # again once the archive is closed
    with open_member(data, shown) as stream:
        assert stream.read() == b"abc"
    root = tmp_path / "dir"
    (root / "R").mkdir(parents=True)
    (root / "R").joinpath(os.fsdecode(b"caf\xe9.txt")).write_bytes(b"xyz")
    assert contents(root) == {"R/caf\\xe9.txt": b"xyz"}
