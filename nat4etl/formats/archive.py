"""Safe, streaming iteration over tar (plain or gzip) and zip members, without extracting.

A directory is read as an archive of its regular files (a data set saved unpacked), so
callers need not care which of the two they were given.

Knows nothing about NEMS0 or NAT4. What it guarantees to the layers above:

- only regular files come out; absolute names, ``..`` components, symlinks, hard links,
  devices and fifos raise `UnsafeMember` (directories are skipped: they carry no data);
- sizes are bounded by `Limits`, checked on the declared sizes up front and on the bytes
  actually inflated while reading, so a decompression bomb is an error, not a full disk;
- a truncated or corrupt archive raises `ArchiveError` naming the file (and member), never
  a raw ``EOFError``/``zlib.error``/``tarfile.ReadError``/``BadZipFile``; so does a zip
  that lists one file name twice (which of the two is meant?);
- bytes after a gzip tar's last gzip member that are not gzip (zero padding is read, as
  gzip reads it) are an `ArchiveError` naming the file and where they start, not a cut in
  the member being read, as the gzip reader's own error suggests (a seekable source is
  read again to tell, on that error only);
- gzip and deflated zip members are inflated with ``isal`` when installed (2-3x faster
  than zlib here), else ``gzip`` and ``zipfile``.

Tar members are read from one forward pass over the inflated stream: open each member's
stream while it is the current one (reading an earlier member later works, but re-inflates
the archive from the start). Zip members can be opened in any order.

Names in errors: ``path`` is the file on disk; ``member`` is the member name, prefixed by
the enclosing member for nested archives (``sites.zip:A1_x.tgz:R/R.resp.h5``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from gzip import BadGzipFile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from nat4etl.errors import ArchiveError, MissingMember, UnsafeMember

try:  # isal: same API as gzip, 2-3x faster inflate
    from isal import igzip as _gzip
    from isal import isal_zlib as _isal_zlib
    from isal.isal_zlib import error as _IsalError
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    import gzip as _gzip

    _isal_zlib = None

    class _IsalError(Exception):  # type: ignore[no-redef]
        pass


__all__ = [
    "GZIP_MAGIC",
    "Limits",
    "Member",
    "Source",
    "extract_all",
    "iter_members",
    "open_member",
    "sniff_format",
]

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_PIECE_BYTES = 4 << 20  # inflate into the caller's buffer this much at a time
_DRAIN_LIMIT_BYTES = 64 << 20  # bytes after the tar end marker we inflate to check the gzip CRC
_GZIP_READ_BYTES = 512 << 10  # compressed bytes read at a time from a gzip stream
_ZIP_READ_BYTES = 1 << 20  # compressed bytes read at a time from a zip member
_SCAN_READ_BYTES = 64 << 10  # compressed bytes per step when diagnosing (<= ~66 MB out)

# Everything a damaged archive can raise from the standard library or isal.
_DAMAGE = (
    EOFError,
    zlib.error,
    _IsalError,
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    struct.error,
    OSError,
    ValueError,  # zipfile: negative seeks and bad fields in a corrupt directory
    NotImplementedError,  # zipfile: unsupported compression method
    RuntimeError,  # zipfile: encrypted member
)
# What the gzip layer raises for bad compressed bytes (isal's reader or gzip.GzipFile).
_GZIP_DAMAGE = (EOFError, BadGzipFile, zlib.error, _IsalError)


@dataclass(frozen=True)
class Limits:
    """Bounds against decompression bombs; generous enough for the real data.

    The A1 population CSV is ~1.9 GB inside a ~30 MB tgz (ratio ~65); deflate itself
    cannot exceed ~1032, so a ratio over ``max_ratio`` on more than ``ratio_floor_bytes``
    is a bomb.
    """

    max_member_bytes: int = 8 << 30
    max_total_bytes: int = 64 << 30
    max_ratio: float = 1000.0
    ratio_floor_bytes: int = 100 << 20


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, eq=False)
class Member:
    """A regular file inside an archive.

    ``open()`` gives a bounded binary stream; ``read()`` the whole content (for the small
    members: JSON, epoch CSV, per-site tgz); ``iter_archive()`` iterates a nested archive.
    """

    name: str
    size_bytes: int
    path: str | None = None
    qualname: str = ""  # the name shown in errors (nested members carry their parent)
    _opener: Callable[[], BinaryIO] | None = field(default=None, repr=False)
    _limits: Limits = field(default=DEFAULT_LIMITS, repr=False)

    @property
    def basename(self) -> str:
        return PurePosixPath(self.name).name

    def open(self) -> BinaryIO:
        """A streaming reader of this member's bytes; errors name file and member."""
        if self._opener is None:
            raise ArchiveError("member has no data stream", path=self.path, member=self.qualname)
        with _damage_as_archive_error(self.path, self.qualname):
            return self._opener()

    def read(self) -> bytes:
        """The whole content; meant for small members (every read is size-bounded)."""
        with self.open() as stream:
            return stream.read()

    def iter_archive(self, *, limits: Limits | None = None) -> Iterator[Member]:
        """Iterate the archive stored in this member (e.g. a per-site tgz inside a zip).

        The member is read into memory (per-site tgz are a few MB) so the inner archive can
        be random-accessed once the outer iteration has moved on.
        """
        data = self.read()
        yield from iter_members(data, path=self.path, limits=limits or self._limits, parent=self)


def sniff_format(head: bytes) -> str:
    """'gzip', 'zip' or 'tar' (the default: tarfile decides) from the first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    return "tar"


def iter_members(
    source: Source,
    *,
    path: str | os.PathLike | None = None,
    limits: Limits | None = None,
    parent: Member | None = None,
) -> Iterator[Member]:
    """Yield the regular-file members of a tar, tar.gz or zip, in archive order.

    Parameters
    ----------
    source
        A path, the archive bytes, or a binary file object (tar may be unseekable; zip
        needs seek). A path to a directory yields its regular files, named by their
        path below it, in sorted order.
    path
        Name used in errors when ``source`` is not a path.
    limits
        Size and ratio bounds (default `Limits()`).
    parent
        The member holding this archive's bytes, if nested: errors then name
        ``parent:member``.

    Raises
    ------
    UnsafeMember
        Path escape, link, device/fifo, or a size/ratio bound exceeded.
    ArchiveError
        Not an archive, truncated or corrupt.
    """
    limits = limits or DEFAULT_LIMITS
    if path is None and isinstance(source, str | os.PathLike):
        path = source
    where = _Where(str(path) if path is not None else None, parent)
    if isinstance(source, str | os.PathLike) and os.path.isdir(source):
        yield from _iter_dir(Path(source), where, limits)
        return
    reopen = _reopener(source, where)
    with contextlib.ExitStack() as stack:
        raw = _open_source(source, where, stack)
        head = _peek(raw, where)
        kind = sniff_format(head)
        if kind == "zip":
            yield from _iter_zip(raw, where, limits, reopen)
        else:
            yield from _iter_tar(raw, kind == "gzip", where, limits, reopen)


@contextlib.contextmanager
def open_member(
    source: Source,
    name: str,
    *,
    path: str | os.PathLike | None = None,
    limits: Limits | None = None,
) -> Iterator[BinaryIO]:
    """Open one member by name: ``with open_member(tgz, 'R/R.resp.csv') as f: ...``.

    Raises `MissingMember` when absent. For a gzip tar this inflates up to the member.
    """
    members = iter_members(source, path=path, limits=limits)
    try:
        for member in members:
            if member.name == name:
                with member.open() as stream:
                    yield stream
                return
        shown = str(path if path is not None else source if isinstance(source, str) else "")
        raise MissingMember(f"no member {name!r}", path=shown or None, member=name)
    finally:
        members.close()


def extract_all(
    source: Source,
    dest: str | os.PathLike,
    *,
    path: str | os.PathLike | None = None,
    limits: Limits | None = None,
    select: Callable[[Member], bool] | None = None,
) -> list[Path]:
    """Write the (selected) members under ``dest``; every target stays inside ``dest``.

    Files are written to a temporary name and renamed, so a failure leaves no partial
    file under a real name. An existing symlink on the way is refused. Returns the paths.
    """
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seen: set[str] = set()
    for member in iter_members(source, path=path, limits=limits):
        if select is not None and not select(member):
            continue
        target = _safe_target(root, member)
        key = str(target)
        if key in seen:
            raise ArchiveError("member appears twice", path=member.path, member=member.qualname)
        seen.add(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        _safe_target(root, member)  # re-check now that the directories exist
        tmp = target.with_name(f".{target.name}.part")
        try:
            with member.open() as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written


# --- shared helpers ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    """The file and enclosing member for error messages."""

    path: str | None
    prefix: Member | None

    def qual(self, name: str | None) -> str | None:
        if self.prefix is None:
            return name
        if name is None:
            return self.prefix.qualname
        return f"{self.prefix.qualname}:{name}"

    def error(self, cls: type[ArchiveError], msg: str, name: str | None = None) -> ArchiveError:
        return cls(msg, path=self.path, member=self.qual(name))


@contextlib.contextmanager
def _damage_as_archive_error(path: str | None, member: str | None) -> Iterator[None]:
    try:
        yield
    except ArchiveError:
        raise
    except _DAMAGE as err:
        raise ArchiveError(_describe(err), path=path, member=member) from err


def _describe(err: BaseException) -> str:
    if isinstance(err, EOFError | tarfile.ReadError) or "end of" in str(err).lower():
        return f"truncated or corrupt archive ({type(err).__name__}: {err})"
    return f"unreadable archive ({type(err).__name__}: {err})"


def _open_source(source: Source, where: _Where, stack: contextlib.ExitStack) -> BinaryIO:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source)
    if isinstance(source, str | os.PathLike):
        try:
            return stack.enter_context(open(source, "rb"))
        except OSError as err:
            raise where.error(ArchiveError, f"cannot open: {err.strerror or err}") from err
    return source


def _reopener(source: Source, where: _Where) -> Callable[[], BinaryIO] | None:
    """How to get a fresh raw stream once iteration is over (paths and bytes only)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return lambda: io.BytesIO(source)
    if isinstance(source, str | os.PathLike):
        return lambda: _open_source(source, where, contextlib.ExitStack())
    return None


def _peek(raw: BinaryIO, where: _Where) -> bytes:
    """First bytes without consuming them (seek back, or a buffered reader's peek)."""
    with _damage_as_archive_error(where.path, where.qual(None)):
        if raw.seekable():
            pos = raw.tell()
            head = raw.read(8)
            raw.seek(pos)
            return head
        peek = getattr(raw, "peek", None)
        if peek is None:
            raise where.error(ArchiveError, "unseekable source without peek(); wrap it")
        return peek(8)[:8]


def _printable(name: str) -> str:
    """A name whose bytes are not UTF-8 (an old tar's Latin-1, a directory's) with those
    bytes as ``\\xNN``: tarfile and os.walk give them as surrogates, which no message or
    Parquet string can hold."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_name(name: str, where: _Where) -> None:
    """Refuse names that would escape an extraction directory."""
    norm = name.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if not name or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise where.error(UnsafeMember, "absolute member path refused", name)
    if ".." in parts:
        raise where.error(UnsafeMember, "member path with '..' refused", name)
    if "\x00" in name:
        raise where.error(UnsafeMember, "member path with NUL refused", name)


def _safe_target(root: Path, member: Member) -> Path:
    target = root.joinpath(*[p for p in member.name.replace("\\", "/").split("/") if p])
    probe = root
    for part in target.relative_to(root).parts:
        probe = probe / part
        if probe.is_symlink():
            raise UnsafeMember(
                "extraction through a symlink refused", path=member.path, member=member.qualname
            )
    if not target.resolve().is_relative_to(root):
        raise UnsafeMember(
            "extraction outside target refused", path=member.path, member=member.qualname
        )
    return target


class _Budget:
    """Counts declared bytes against the total limit, member by member."""

    def __init__(self, limits: Limits, where: _Where):
        self.limits = limits
        self.where = where
        self.total = 0

    def admit(self, name: str, size: int, compressed: int | None = None) -> None:
        lim = self.limits
        if size < 0:
            raise self.where.error(ArchiveError, f"negative size {size}", name)
        if size > lim.max_member_bytes:
            msg = f"member is {size} bytes, over the {lim.max_member_bytes}-byte limit"
            raise self.where.error(UnsafeMember, msg, name)
        self.total += size
        if self.total > lim.max_total_bytes:
            msg = f"archive holds over {lim.max_total_bytes} bytes (limit)"
            raise self.where.error(UnsafeMember, msg, name)
        if compressed is not None and size > lim.ratio_floor_bytes:
            if size > lim.max_ratio * max(compressed, 1):
                msg = f"compression ratio {size / max(compressed, 1):.0f} over {lim.max_ratio:.0f}"
                raise self.where.error(UnsafeMember, msg, name)


class _MemberStream(io.RawIOBase):
    """A member's bytes: bounded by its size, errors renamed to ArchiveError."""

    def __init__(
        self,
        read_into: Callable[[memoryview], int],
        size: int,
        where: _Where,
        name: str,
        on_close: Callable[[], None] | None = None,
    ):
        super().__init__()
        self._read_into = read_into
        self._left = size
        self._where = where
        self._name = name
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed and self._on_close is not None:
            self._on_close()
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed member stream")
        view = memoryview(b).cast("B")
        want = min(len(view), self._left)
        if want <= 0:
            return 0
        with _damage_as_archive_error(self._where.path, self._where.qual(self._name)):
            got = self._read_into(view[:want])
        if got == 0:
            raise self._where.error(ArchiveError, "truncated member data", self._name)
        self._left -= got
        return got

    def readall(self) -> bytes:
        # Grow piece by piece: a header may declare gigabytes that are not there.
        pieces = []
        while self._left > 0:
            piece = bytearray(min(self._left, _PIECE_BYTES))
            got = self.readinto(piece)
            pieces.append(piece[:got] if got < len(piece) else piece)
        return b"".join(pieces)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(min(size, max(self._left, 0)))
        got = self.readinto(buf)
        return bytes(buf[:got])


# --- tar -----------------------------------------------------------------------------------


class _Inflated(io.RawIOBase):
    """Seekable view of a (possibly gzip) stream that enforces the ratio and total bounds.

    Forward seeks inflate and discard in large pieces; backward seeks restart the inflate
    (only if the raw source can seek).
    """

    def __init__(self, raw: BinaryIO, gzipped: bool, limits: Limits, where: _Where):
        super().__init__()
        self._counter = _CountingReader(raw)
        self._inner: BinaryIO = _gunzipped(self._counter) if gzipped else self._counter
        self._gzipped = gzipped
        self._pos = 0
        self._seen = 0  # furthest decompressed byte reached
        self._limits = limits
        self._where = where
        self.member: str | None = None  # the member being read, for the messages
        self.last_block: tuple[int, bytes] = (-1, b"")

    @property
    def gzipped(self) -> bool:
        return self._gzipped

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        # At most _PIECE_BYTES a call, so the ratio and total bounds are checked as we go.
        view = memoryview(b).cast("B")[:_PIECE_BYTES]
        try:  # a NOP in 3.11 when nothing is raised (and the else: no jump)
            got = self._inner.readinto(view)
        except _GZIP_DAMAGE as err:
            self._refuse_appended(err)
            raise
        else:
            self._advance(got)
            return got

    def read(self, size: int = -1) -> bytes:
        at = self._pos
        try:
            data = self._inner.read(size)
        except _GZIP_DAMAGE as err:
            self._refuse_appended(err)
            raise
        else:
            self._advance(len(data))
            if size == tarfile.BLOCKSIZE:  # a header read: kept so the end check needs no rewind
                self.last_block = (at, data)
            return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("only absolute seeks")
        if offset < self._pos:
            try:
                self._inner.seek(offset)  # gzip rewinds and re-inflates
            except _GZIP_DAMAGE as err:
                self._refuse_appended(err)
                raise
            self._pos = offset
        scratch = None
        while self._pos < offset:
            if scratch is None:
                scratch = memoryview(bytearray(min(_PIECE_BYTES, offset - self._pos)))
            if not self.readinto(scratch[: offset - self._pos]):
                break  # past the end: the next read finds nothing, as for a file
        return self._pos

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos <= self._seen:
            return
        self._seen = self._pos
        lim = self._limits
        if self._seen > lim.max_total_bytes:
            msg = f"inflates past the {lim.max_total_bytes}-byte limit"
            raise self._where.error(UnsafeMember, msg, self.member)
        if self._gzipped and self._seen > lim.ratio_floor_bytes:
            ratio = self._seen / max(self._counter.count, 1)
            if ratio > lim.max_ratio:
                msg = f"compression ratio {ratio:.0f} over {lim.max_ratio:.0f}: decompression bomb"
                raise self._where.error(UnsafeMember, msg, self.member)

    def drain(self) -> None:
        """Inflate what follows the tar end marker so gzip checks its CRC and length."""
        if not self._gzipped:
            return
        self.seek(self._pos + _DRAIN_LIMIT_BYTES)

    def _refuse_appended(self, err: BaseException) -> None:
        """Raise an error saying so when the gzip reader failed on bytes after its data.

        The reader takes them for a further gzip member and says "ended before the
        end-of-stream marker" or "not a gzipped file", which reads as a cut inside the tar
        member being read. Only on this error path is the file scanned again to tell.
        """
        if not self._gzipped or not self._counter.seekable():
            return
        try:
            back = self._counter.tell()
            self._counter.seek(0)
            found = _bytes_after_gzip(self._counter, self._limits.max_total_bytes)
            self._counter.seek(back)
        except (*_GZIP_DAMAGE, OSError, ValueError):
            return  # cannot tell: the reader's own error stands
        if found is None:
            return
        end, size = found
        extra = size - end
        what = "1 byte" if extra == 1 else f"{extra} bytes"
        msg = (
            f"{what} after the end of its gzip data (at byte {end} of {size})"
            f" {'is' if extra == 1 else 'are'} not gzip: something was appended to the file"
        )
        raise self._where.error(ArchiveError, msg) from err


def _gunzipped(raw: BinaryIO) -> BinaryIO:
    """A gzip stream's inflated bytes, read into the caller's buffer where the inflate can.

    GzipFile.readinto is read() + copy (a fresh bytes object per call); isal's reader
    under it inflates straight into a buffer, so that reader is used without the wrapper.
    """
    reader = getattr(_isal_zlib, "_GzipReader", None)  # isal's own, private: checked
    if reader is not None:
        return io.BufferedReader(reader(raw, _GZIP_READ_BYTES))
    return _gzip.GzipFile(fileobj=raw, mode="rb")


def _bytes_after_gzip(stream: BinaryIO, max_bytes: int) -> tuple[int, int] | None:
    """(end of the last whole gzip member, size) when the bytes after it are not gzip.

    Reads ``stream`` from its current position to the first problem. Zero padding after
    a member is skipped, as gzip does. None when nothing follows the members, or the
    damage is inside one (a cut, a bad CRC), or more than ``max_bytes`` inflate first.
    """
    inflate = _isal_zlib or zlib
    offset = 0  # compressed bytes read so far
    end = 0  # just past the last whole member
    pending = b""  # read, not yet inflated
    inflated = 0
    while True:
        while len(pending := pending.lstrip(b"\0")) < 4:  # magic, method, flags
            piece = stream.read(_SCAN_READ_BYTES)
            if not piece:
                break
            offset += len(piece)
            pending += piece
        if not pending:
            return None
        # RFC 1952: a member's method is 8 (deflate) and its flags' top 3 bits are 0; the
        # magic alone may start any bytes (a cut header is left to the reader's own error)
        if not pending.startswith(GZIP_MAGIC) or (
            len(pending) >= 4 and (pending[2] != 8 or pending[3] & 0xE0)
        ):
            return end, stream.seek(0, io.SEEK_END)
        member = inflate.decompressobj(wbits=31)
        while not member.eof:
            if not pending:
                pending = stream.read(_SCAN_READ_BYTES)
                if not pending:
                    return None  # cut inside this member
                offset += len(pending)
            inflated += len(member.decompress(pending))
            if inflated > max_bytes:
                return None
            pending = member.unused_data
        end = offset - len(pending)


class _CountingReader(io.RawIOBase):
    """Counts compressed bytes consumed (for the ratio bound)."""

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self._raw = raw
        self.count = 0
        self._start = raw.tell() if raw.seekable() else 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def readinto(self, b) -> int:
        got = self._raw.readinto(b) if hasattr(self._raw, "readinto") else _copy_read(self._raw, b)
        self.count += got or 0
        return got or 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.count += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            return self._raw.seek(self._start + offset) - self._start
        return self._raw.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._raw.tell() - self._start


def _copy_read(raw: BinaryIO, b) -> int:
    data = raw.read(len(b))
    memoryview(b)[: len(data)] = data
    return len(data)


def _iter_tar(
    raw: BinaryIO,
    gzipped: bool,
    where: _Where,
    limits: Limits,
    reopen: Callable[[], BinaryIO] | None,
) -> Iterator[Member]:
    stream = _Inflated(raw, gzipped, limits, where)
    budget = _Budget(limits, where)
    with _damage_as_archive_error(where.path, where.qual(None)):
        tar = tarfile.open(fileobj=stream, mode="r:")
    with tar:
        while True:
            with _damage_as_archive_error(where.path, where.qual(stream.member)):
                info = tar.next()
            if info is None:
                break
            info.name = _printable(info.name)  # the data is found by offset, not name
            stream.member = info.name
            _check_name(info.name, where)
            if info.isdir():
                continue
            _check_tar_type(info, where)
            budget.admit(info.name, info.size)
            yield Member(
                name=info.name,
                size_bytes=info.size,
                path=where.path,
                qualname=where.qual(info.name) or info.name,
                _opener=_tar_opener(tar, stream, info, where, _TarReopen(reopen, gzipped, limits)),
                _limits=limits,
            )
        with _damage_as_archive_error(where.path, where.qual(None)):
            _check_tar_end(tar, stream, where)
            stream.drain()


def _check_tar_type(info: tarfile.TarInfo, where: _Where) -> None:
    if info.issym() or info.islnk():
        kind = "symlink" if info.issym() else "hard link"
        raise where.error(UnsafeMember, f"{kind} to {info.linkname!r} refused", info.name)
    if info.ischr() or info.isblk() or info.isfifo():
        raise where.error(UnsafeMember, "device or fifo member refused", info.name)
    if not info.isreg():
        raise where.error(UnsafeMember, f"member type {info.type!r} refused", info.name)


@dataclass(frozen=True)
class _TarReopen:
    """What a member needs to read itself again after the archive was closed."""

    reopen: Callable[[], BinaryIO] | None
    gzipped: bool
    limits: Limits


def _tar_opener(
    tar: tarfile.TarFile,
    stream: _Inflated,
    info: tarfile.TarInfo,
    where: _Where,
    again: _TarReopen,
) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        on_close = None
        if tar.closed:
            # Iteration is over: read from a fresh stream (a gzip tar re-inflates up to here).
            if again.reopen is None or info.issparse():
                msg = "archive already closed; open members of a stream while iterating"
                raise where.error(ArchiveError, msg, info.name)
            raw = again.reopen()
            source, on_close = _Inflated(raw, again.gzipped, again.limits, where), raw.close
        elif info.issparse():
            ex = tar.extractfile(info)
            assert ex is not None
            return io.BufferedReader(
                _MemberStream(ex.readinto, info.size, where, info.name, ex.close)
            )
        else:
            source = stream
        return io.BufferedReader(
            _MemberStream(_positioned_reader(source, info), info.size, where, info.name, on_close),
            buffer_size=1 << 16,
        )

    return opener


def _positioned_reader(stream: _Inflated, info: tarfile.TarInfo) -> Callable[[memoryview], int]:
    """readinto at our own offset, so interleaved use with iteration stays correct."""
    pos = info.offset_data

    def read_into(view: memoryview) -> int:
        nonlocal pos
        if stream.tell() != pos:
            stream.seek(pos)
        stream.member = info.name
        got = 0
        while got < len(view):
            n = stream.readinto(view[got:])
            if not n:
                break
            got += n
        pos += got
        return got

    return read_into


def _check_tar_end(tar: tarfile.TarFile, stream: _Inflated, where: _Where) -> None:
    """tarfile treats a truncated or garbled header after the first as the end; we don't.

    One exception, which tarfile (and so NEMS0) also reads: a gzip stream that ends
    cleanly right after a member, without the tar's end-of-archive blocks. Its CRC and
    length have then vouched for every byte, so nothing was cut; in a plain tar the
    missing marker is the only sign of a cut at a member boundary, and stays an error.
    """
    at, block = stream.last_block
    if at != tar.offset:
        stream.seek(tar.offset)
        block = stream.read(tarfile.BLOCKSIZE)
    if not block and stream.gzipped:
        return
    if len(block) < tarfile.BLOCKSIZE:
        raise where.error(ArchiveError, "tar ends without its end-of-archive marker (truncated?)")
    if block.count(0) != len(block):
        raise where.error(ArchiveError, f"bad tar header at byte {tar.offset}")


# --- directory -----------------------------------------------------------------------------


def _iter_dir(root: Path, where: _Where, limits: Limits) -> Iterator[Member]:
    """The regular files below ``root``; links and special files refused as in a tar."""
    budget = _Budget(limits, where)
    with _damage_as_archive_error(where.path, where.qual(None)):
        names = sorted(_walk(root))
    for raw_name in names:
        name = _printable(raw_name)
        _check_name(name, where)
        file = root.joinpath(*raw_name.split("/"))
        with _damage_as_archive_error(where.path, where.qual(name)):
            st = file.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise where.error(UnsafeMember, "symlink refused", name)
        if not stat.S_ISREG(st.st_mode):
            raise where.error(UnsafeMember, f"special file (mode {oct(st.st_mode)}) refused", name)
        budget.admit(name, st.st_size)
        yield Member(
            name=name,
            size_bytes=st.st_size,
            path=where.path,
            qualname=where.qual(name) or name,
            _opener=_file_opener(file, st.st_size, where, name),
            _limits=limits,
        )


def _walk(root: Path) -> Iterator[str]:
    """Relative '/'-joined names of everything below ``root`` but directories (not
    followed through links)."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        base = Path(dirpath).relative_to(root)
        for entry in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield (base / entry).as_posix()


def _raise(err: OSError) -> None:
    raise err


def _file_opener(file: Path, size: int, where: _Where, name: str) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        raw = open(file, "rb")
        return io.BufferedReader(
            _MemberStream(raw.readinto, size, where, name, raw.close), buffer_size=1 << 16
        )

    return opener


# --- zip -----------------------------------------------------------------------------------


def _iter_zip(
    raw: BinaryIO, where: _Where, limits: Limits, reopen: Callable[[], BinaryIO] | None
) -> Iterator[Member]:
    if not raw.seekable():
        raise where.error(ArchiveError, "zip needs a seekable source")
    with _damage_as_archive_error(where.path, where.qual(None)):
        zf = zipfile.ZipFile(raw)
    budget = _Budget(limits, where)
    with zf:
        _check_zip_names_unique(zf, where)
        for info in zf.infolist():
            _check_name(info.filename, where)
            if info.is_dir():
                continue
            _check_zip_type(info, where)
            budget.admit(info.filename, info.file_size, info.compress_size)
            yield Member(
                name=info.filename,
                size_bytes=info.file_size,
                path=where.path,
                qualname=where.qual(info.filename) or info.filename,
                _opener=_zip_opener(zf, info, where, reopen),
                _limits=limits,
            )


def _check_zip_names_unique(zf: zipfile.ZipFile, where: _Where) -> None:
    """A file name listed twice in the central directory (``zipfile`` appends one rather
    than replace it) is two files under one name: which one is meant? A reader by name
    gets the last, a loop over members both (align-wav placed whichever decoded last, and
    a site file twice was one site's units twice, refused by the store naming no file)."""
    seen: set[str] = set()
    for info in zf.infolist():
        if info.is_dir():
            continue
        if info.filename in seen:
            raise where.error(ArchiveError, "member appears twice", info.filename)
        seen.add(info.filename)


def _check_zip_type(info: zipfile.ZipInfo, where: _Where) -> None:
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # unix attributes present
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise where.error(UnsafeMember, "symlink refused", info.filename)
        if kind not in (0, stat.S_IFREG):
            raise where.error(
                UnsafeMember, f"special file (mode {oct(mode)}) refused", info.filename
            )
    if info.flag_bits & 0x1:
        raise where.error(ArchiveError, "encrypted member", info.filename)


def _zip_opener(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    where: _Where,
    reopen: Callable[[], BinaryIO] | None,
) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        archive_file, raw = zf, None
        if zf.fp is None:  # closed: iteration is over
            if reopen is None:
                msg = "archive already closed; open members of a stream while iterating"
                raise where.error(ArchiveError, msg, info.filename)
            raw = reopen()
            archive_file = zipfile.ZipFile(raw)
        handle = _isal_member(archive_file, info) or archive_file.open(info)

        def close() -> None:
            handle.close()
            if raw is not None:
                archive_file.close()
                raw.close()

        return io.BufferedReader(
            _MemberStream(handle.readinto, info.file_size, where, info.filename, close),
            buffer_size=1 << 16,
        )

    return opener


def _isal_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> BinaryIO | None:
    """A stored or deflated member's data, inflated and CRC-checked with isal; None for
    other methods or without isal (zipfile then reads it).

    zipfile inflates with zlib and checks the CRC-32 with zlib: A1's site files (62 MB)
    took it 0.20 s, isal 0.08 s. zipfile still finds and checks the member's local
    header; it is asked for the member's bytes as stored, with no CRC of its own.
    """
    if _isal_zlib is None or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return None
    as_stored = copy.copy(info)
    as_stored.compress_type = zipfile.ZIP_STORED
    as_stored.file_size = info.compress_size
    as_stored.CRC = None  # zipfile skips its check; _IsalZipMember checks the real one
    return _IsalZipMember(zf.open(as_stored), info)


class _IsalZipMember(io.RawIOBase):
    """The data of a zip member from its stored bytes: inflated when deflated, CRC-32
    checked at its end as zipfile does (same error), never more than a piece inflated
    at once."""

    def __init__(self, stored: BinaryIO, info: zipfile.ZipInfo):
        super().__init__()
        self._stored = stored
        self._info = info
        deflated = info.compress_type == zipfile.ZIP_DEFLATED
        self._inflate = _isal_zlib.decompressobj(-15) if deflated else None
        self._stored_left = info.compress_size  # ends with the last byte, as in zipfile
        self._crc = 0
        self._out = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        while not self._out and not self._ended:
            self._out = memoryview(self._next_piece())
            self._crc = _isal_zlib.crc32(self._out, self._crc)
            if self._ended and self._crc != self._info.CRC:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file {self._info.filename!r}")
        n = min(len(view), len(self._out))
        view[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _next_piece(self) -> bytes:
        inflate = self._inflate
        if inflate is None:
            piece = self._stored.read(min(self._stored_left, _ZIP_READ_BYTES))
            self._stored_left -= len(piece)
            self._ended = self._stored_left <= 0 or not piece
            return piece
        data = inflate.unconsumed_tail or self._stored.read(_ZIP_READ_BYTES)
        if not data:
            if not inflate.eof:
                raise EOFError("compressed zip member ends before its deflate stream")
            self._ended = True
            return b""
        piece = inflate.decompress(data, _PIECE_BYTES)
        if inflate.eof and not inflate.unconsumed_tail:
            self._ended = True
        return piece

    def close(self) -> None:
        if not self.closed:
            self._stored.close()
        super().close()
