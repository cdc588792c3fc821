"""Every error nat4etl raises on purpose, one tree so callers catch at the level they need.

    Nat4EtlError                 base; carries ``path`` and ``member`` when known
      NotImplementedYet          a stage whose issue has not landed          exit 2
      ConfigError                bad option / config value                   exit 2
      FormatError                bad bytes in a file (CSV/JSON/HDF5/epochs)  exit 3
        ArchiveError             a tar/zip that cannot be read
          UnsafeMember           path escape, link, device, bomb
          MissingMember          an expected member is absent
      InputMismatch              inputs disagree (missing wavs, ...)         exit 3
      FetchError                 network / download failure                  exit 4
        RemoteUnavailable        retries exhausted, HTTP error
        RemoteRefused            a status retrying cannot change (404, 403, ...)
      VerificationError          a digest or size does not match             exit 6
        ChecksumMismatch
      StoreError                 the output store is unusable                exit 7
        SchemaError              wrong / incompatible table schema
        DuplicateKeyError        a table key repeats
        MissingTableError        a table the caller needs is absent
      StoreLocked                another process holds the store's lock      exit 5

Exit codes live in ``EXIT_CODES`` so the CLI maps errors in one place.
"""

from __future__ import annotations

from pathlib import Path


class Nat4EtlError(Exception):
    """Base class. ``str(err)`` is a complete one-line message."""

    exit_code = 1

    def __init__(self, msg: str, *, path: str | Path | None = None, member: str | None = None):
        self.path = str(path) if path is not None else None
        self.member = member
        where = ""
        if self.path is not None:
            where = Path(self.path).name if member is None else f"{Path(self.path).name}:{member}"
        elif member is not None:
            where = member
        self.msg = msg
        super().__init__(f"{where}: {msg}" if where else msg)


class NotImplementedYet(Nat4EtlError):
    exit_code = 2


class ConfigError(Nat4EtlError):
    exit_code = 2


class FormatError(Nat4EtlError):
    exit_code = 3


class ArchiveError(FormatError):
    pass


class UnsafeMember(ArchiveError):
    pass


class MissingMember(ArchiveError):
    pass


class InputMismatch(Nat4EtlError):
    exit_code = 3


class FetchError(Nat4EtlError):
    exit_code = 4


class RemoteUnavailable(FetchError):
    pass


class RemoteRefused(FetchError):
    """The server answered with a status that retrying cannot change (``status_code``)."""

    def __init__(self, msg: str, *, status_code: int | None = None, **where):
        super().__init__(msg, **where)
        self.status_code = status_code


class VerificationError(Nat4EtlError):
    exit_code = 6


class ChecksumMismatch(VerificationError):
    pass


class StoreError(Nat4EtlError):
    exit_code = 7


class SchemaError(StoreError):
    pass


class DuplicateKeyError(StoreError):
    pass


class MissingTableError(StoreError):
    pass


class StoreLocked(Nat4EtlError):
    exit_code = 5


EXIT_CODES = {
    "ok": 0,
    "unexpected": 1,
    "usage": 2,
    "bad_input": FormatError.exit_code,
    "network": FetchError.exit_code,
    "lock_held": StoreLocked.exit_code,
    "verification": VerificationError.exit_code,
    "store": StoreError.exit_code,
    "interrupted": 130,  # Ctrl-C / SIGINT; the store is as it was unless this run had published
    "output_closed": 141,  # stdout's reader went away (`| head`), as SIGPIPE ends Unix tools
}
