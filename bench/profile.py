"""`make profile`: where a cold full-scale build spends its time, by pyinstrument.

Runs one cold ``build --source`` of the cached full-scale sample (the one `make bench`
uses, generated here if missing) inside this process under pyinstrument, then writes the
call tree to ``bench/results/profile-<UTC time>.txt`` and ``.html`` and prints its top.

pyinstrument samples the main thread. Work on nat4etl's other threads (the background
writer's Parquet encoding, the inflate thread under the CSV parser, the two site threads)
shows there as the waits for it (``WriteBehind.wait``, ``Future.result``). For every thread
and the native code under numpy and Arrow, run ``perf record -g`` on the same build command
(the README's breakdown was measured that way) or ``py-spy record --threads --native``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CACHE, RESULTS, build_args, sample_mirror  # noqa: E402

#: lines of the text report printed (the files hold all of it)
PRINTED_LINES = 60


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interval", type=float, default=0.001, help="sampling interval, s")
    args = p.parse_args(argv)

    from pyinstrument import Profiler

    from nat4etl.cli import cli

    mirror = sample_mirror("full")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="profile-") as tmp:
        command = build_args(mirror, Path(tmp) / "nat4")[3:]  # without `python -m nat4etl.cli`
        profiler = Profiler(interval=args.interval)
        started = time.perf_counter()
        profiler.start()
        try:
            cli.main(command, prog_name="nat4etl", standalone_mode=False)
        finally:
            profiler.stop()
        wall_s = time.perf_counter() - started

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = profiler.output_text(unicode=False, color=False)
    (RESULTS / f"profile-{stamp}.txt").write_text(text)
    (RESULTS / f"profile-{stamp}.html").write_text(profiler.output_html())
    print("\n".join(text.splitlines()[:PRINTED_LINES]))
    print(f"\ncold build profiled: {wall_s:.1f} s wall (with the profiler's overhead)")
    print(f"full report: {RESULTS / f'profile-{stamp}.txt'} and .html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
