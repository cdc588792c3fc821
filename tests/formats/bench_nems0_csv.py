"""Throughput of the population-CSV path: inflate (zlib vs isal), parse, both together.

Not a test (pytest does not collect it). Run:

    .venv/bin/python tests/formats/bench_nems0_csv.py [--rows 20000] [--kind resp|stim]

Writes a synthetic 849-column ``%.18e`` CSV in a tgz the way NEMS0 does (resp: spike
counts with a NaN validation block, ratio ~100; stim: random floats, ratio ~2.3) and
reports MB/s of decompressed text (best of 3, wall clock and CPU).
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from nat4etl.formats import archive, nems0_csv


def write_tgz(path: Path, kind: str, n_rows: int, n_chans: int = 849) -> int:
    rng = np.random.default_rng(0)
    text = io.BytesIO()
    for lo in range(0, n_rows, 2000):
        rows = min(2000, n_rows - lo)
        if kind == "resp":
            block = rng.poisson(0.15, size=(rows, n_chans)).astype(float)
            if lo < 2700:
                block[:, :33] = np.nan  # units without validation data
        else:
            block = rng.gamma(1.0, 0.3, size=(rows, n_chans))
        np.savetxt(text, block, delimiter=",", fmt="%.18e")
    data = text.getvalue()
    with tarfile.open(path, "w:gz", compresslevel=6) as tf:
        info = tarfile.TarInfo(f"R/R.{kind}.csv")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return len(data)


def clock(fn) -> tuple[float, float]:
    runs = []
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--kind", choices=["resp", "stim"], default="resp")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "R.tgz"
        size = write_tgz(path, args.kind, args.rows)
        text = b"".join(m.read() for m in archive.iter_members(path))
        print(f"{args.kind}: {size / 1e6:.0f} MB of text, {path.stat().st_size / 1e6:.1f} MB tgz")

        def zlib_inflate():
            d = zlib.decompressobj(31)
            with open(path, "rb") as raw:
                while piece := raw.read(1 << 16):
                    d.decompress(piece)

        def isal_inflate():
            for m in archive.iter_members(path):
                with m.open() as f:
                    buf = bytearray(16 << 20)
                    while f.readinto(buf):
                        pass

        def parse(threads):
            return lambda: sum(
                b.size for b in nems0_csv.iter_raster_blocks(io.BytesIO(text), threads=threads)
            )

        def both(threads):
            def run():
                for m in archive.iter_members(path):
                    with m.open() as f:
                        for _ in nems0_csv.iter_raster_blocks(f, threads=threads):
                            pass

            return run

        for name, fn in [
            ("zlib inflate, 1 thread", zlib_inflate),
            ("isal inflate (archive.py)", isal_inflate),
            ("parse only, 1 thread", parse(1)),
            ("parse only, 2 threads", parse(2)),
            ("inflate + parse, 1 parser", both(1)),
            ("inflate + parse, 2 parsers", both(2)),
        ]:
            wall, cpu = clock(fn)
            print(
                f"  {name:28s} {size / wall / 1e6:6.0f} MB/s wall  {size / cpu / 1e6:6.0f} MB/s per CPU-s"
            )


if __name__ == "__main__":
    main()
