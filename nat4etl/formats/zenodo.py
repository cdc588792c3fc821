"""Zenodo record JSON -> the list of files it offers, whatever shape Zenodo used that year.

Three shapes are accepted (``docs/nat4-dataset.md``, "Zenodo API"):

- legacy: ``files: [{key, size, checksum: "md5:<hex>", links: {self: <url>}}]``
- new (after the 2023 migration): ``files: [{filename, filesize, checksum: "<hex>"}]``
- export: ``files: {entries: {<key>: {key, size, checksum, links: {content: <url>}}}}``
  (a list under ``entries`` is accepted too)

The content URL is ``links.content``, else ``{base_url}/api/records/{id}/files/{key}/content``
(the dataset notes' order), and ``links.self`` only when the record has no id to build that
from: on today's Zenodo a file's ``self`` may name its metadata, not its bytes. Where the
record id is known, the API's content URL and the web page's download link,
``{base_url}/records/{id}/files/{key}?download=1``, are kept as fallbacks for a primary URL
the server refuses. This module knows HTTP shapes only, nothing of NAT4 or of which files a
caller needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin

from nat4etl.errors import FormatError
from nat4etl.hashing import normalize_md5

_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class RemoteFile:
    """One file a record offers: its name, size, md5 (lower-case hex) and content URL.

    ``fallback_urls``: the same bytes elsewhere, in the order to try them when the server
    refuses ``url`` (404, 403, 410): Zenodo has moved its download routes before.
    """

    name: str
    size_bytes: int
    md5: str
    url: str
    fallback_urls: tuple[str, ...] = ()


def record_url(base_url: str, record_id: int | str) -> str:
    """``{base}/api/records/{id}``, the one endpoint every Zenodo version answers."""
    return f"{base_url.rstrip('/')}/api/records/{record_id}"


def content_url(base_url: str, record_id: int | str, name: str) -> str:
    """The API's content URL, used when an entry carries no link."""
    return f"{record_url(base_url, record_id)}/files/{quote(name)}/content"


def download_url(base_url: str, record_id: int | str, name: str) -> str:
    """The record web page's download link (the dataset notes' last resort)."""
    return f"{base_url.rstrip('/')}/records/{record_id}/files/{quote(name)}?download=1"


def parse_record_bytes(
    data: bytes, *, base_url: str, record_id: int | str | None = None, source: str = "record.json"
) -> list[RemoteFile]:
    """Decode JSON bytes then :func:`parse_record`; bad JSON is a :class:`FormatError`."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"not JSON ({err}); expected a Zenodo record"
        raise FormatError(msg, path=source) from err
    return parse_record(record, base_url=base_url, record_id=record_id, source=source)


def parse_record(
    record: Any, *, base_url: str, record_id: int | str | None = None, source: str = "record.json"
) -> list[RemoteFile]:
    """List the files of a Zenodo record, in the record's order.

    Parameters
    ----------
    record
        The decoded record JSON.
    base_url
        Zenodo base URL (``https://zenodo.org``); relative links resolve against it and
        entries without links get ``{base_url}/api/records/{id}/files/{key}/content``.
    record_id
        Used for fallback URLs when the record has no ``id``.
    source
        Named in error messages.
    """
    if not isinstance(record, dict):
        raise FormatError("expected a JSON object (a Zenodo record)", path=source)
    rid = record.get("id", record_id)
    if rid is None:
        rid = record.get("recid")
    entries = _file_entries(record.get("files"), source)
    files = [
        _remote_file(entry, base_url=base_url, record_id=rid, source=source) for entry in entries
    ]
    names = [f.name for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FormatError(f"file listed twice: {', '.join(duplicates)}", path=source)
    return files


def _file_entries(files: Any, source: str) -> list[dict[str, Any]]:
    """The per-file dicts from any of the three shapes."""
    if isinstance(files, dict):
        entries = files.get("entries")
        if isinstance(entries, dict):
            # export shape: keyed by file name; the key wins when the entry omits it
            return [
                {"key": key, **entry} for key, entry in entries.items() if isinstance(entry, dict)
            ]
        files = entries
    if not isinstance(files, list):
        msg = (
            f"no file list: 'files' is {type(files).__name__}, expected a list or {{entries: ...}}"
        )
        raise FormatError(msg, path=source)
    bad = [i for i, entry in enumerate(files) if not isinstance(entry, dict)]
    if bad:
        raise FormatError(f"files[{bad[0]}] is not an object", path=source)
    return files


def _remote_file(
    entry: dict[str, Any], *, base_url: str, record_id: Any, source: str
) -> RemoteFile:
    name = entry.get("key", entry.get("filename"))
    if not isinstance(name, str) or not _is_plain_name(name):
        # the name becomes a path on disk: refuse anything that could escape the target dir
        raise FormatError(f"unsafe or missing file name {name!r}", path=source)
    size = entry.get("size", entry.get("filesize"))
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise FormatError(f"size {size!r} is not a byte count", path=source, member=name)
    url = _url(
        entry.get("links") or {}, base_url=base_url, record_id=record_id, name=name, source=source
    )
    fallbacks = ()
    if record_id is not None:
        alternatives = (
            content_url(base_url, record_id, name),
            download_url(base_url, record_id, name),
        )
        fallbacks = tuple(u for u in dict.fromkeys(alternatives) if u != url)
    return RemoteFile(
        name=name,
        size_bytes=size,
        md5=_md5(entry.get("checksum"), name=name, source=source),
        url=url,
        fallback_urls=fallbacks,
    )


def _md5(checksum: Any, *, name: str, source: str) -> str:
    if not isinstance(checksum, str):
        raise FormatError(f"checksum {checksum!r} missing, expected md5", path=source, member=name)
    algo, _, value = checksum.strip().rpartition(":")
    if algo and algo.lower() != "md5":
        raise FormatError(
            f"checksum {checksum!r} is {algo}, expected md5", path=source, member=name
        )
    value = normalize_md5(value)
    if len(value) != 32 or not set(value) <= _HEX:
        raise FormatError(
            f"checksum {checksum!r} is not an md5 hex digest", path=source, member=name
        )
    return value


def _url(links: Any, *, base_url: str, record_id: Any, name: str, source: str) -> str:
    links = links if isinstance(links, dict) else {}

    def link(key: str) -> str | None:
        value = links.get(key)
        return (
            urljoin(base_url.rstrip("/") + "/", value) if isinstance(value, str) and value else None
        )

    url = link("content") or (
        content_url(base_url, record_id, name) if record_id is not None else link("self")
    )
    if url is None:
        raise FormatError("no content link and no record id to build one", path=source, member=name)
    return url


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in {".", ".."} and not any(c in name for c in "/\\\0")
