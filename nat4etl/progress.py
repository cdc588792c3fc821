"""Progress and log lines for every stage, in four renderings of one small protocol.

A stage reports *tasks* (a name, an optional total, a unit) and *log lines*; it never
knows how they are shown:

- ``rich``: live progress bars (a terminal);
- ``plain``: one line per task start/end and per log line (cron, CI, pipes);
- ``json``: one JSON object per line, for machines;
- ``quiet``: only warnings and errors, as plain lines.

:func:`make_progress` picks ``rich`` when both stdout and the stream are TTYs, ``plain``
otherwise.
Every implementation is a context manager (the caller owns the lifetime, so several
stages can share one display) and is safe to call from worker threads.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TextIO, runtime_checkable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichBars
from rich.table import Column
from rich.text import Text

Mode = Literal["auto", "rich", "plain", "json", "quiet"]
Level = Literal["debug", "info", "warning", "error"]


@runtime_checkable
class Progress(Protocol):
    """What stages call. ``task`` names are unique among running tasks (a file name)."""

    def start(self, task: str, *, total: int | None = None, unit: str = "B") -> None:
        """A task begins; ``total`` in ``unit`` (``"B"``: bytes) when known."""

    def advance(self, task: str, n: int) -> None:
        """``n`` more units of ``task`` are done."""

    def reset(self, task: str) -> None:
        """``task`` went back to 0 (a download restarted from scratch)."""

    def done(self, task: str) -> None:
        """``task`` finished (successfully or not: the log line says which)."""

    def log(self, msg: str, *, level: Level = "info", **fields: Any) -> None:
        """One line for the user; ``fields`` are kept as keys in ``json`` mode."""


class _Base:
    """No-op context manager plumbing shared by the implementations."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class NullProgress(_Base):
    """Shows nothing: the default when a caller passes no progress."""

    def start(self, task: str, *, total: int | None = None, unit: str = "B") -> None:
        pass

    def advance(self, task: str, n: int) -> None:
        pass

    def reset(self, task: str) -> None:
        pass

    def done(self, task: str) -> None:
        pass

    def log(self, msg: str, *, level: Level = "info", **fields: Any) -> None:
        pass


class _Task:
    __slots__ = ("total", "unit", "completed", "started_s")

    def __init__(self, total: int | None, unit: str) -> None:
        self.total = total
        self.unit = unit
        self.completed = 0
        self.started_s = time.monotonic()


class _Counting(_Base):
    """Task bookkeeping shared by the line-oriented renderings (thread-safe)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._tasks: dict[str, _Task] = {}
        self._lock = threading.Lock()

    def _begin(self, task: str, total: int | None, unit: str) -> None:
        with self._lock:
            self._tasks[task] = _Task(total, unit)

    def advance(self, task: str, n: int) -> None:
        with self._lock:
            if task in self._tasks:
                self._tasks[task].completed += n

    def _zero(self, task: str) -> None:
        with self._lock:
            if task in self._tasks:
                self._tasks[task].completed = 0

    def _end(self, task: str) -> _Task | None:
        with self._lock:
            return self._tasks.pop(task, None)


class PlainProgress(_Counting):
    """Line-oriented output: ``start``/``done`` per task and every log line, with a time.

    ``min_level`` drops lower log levels (quiet mode is ``min_level="warning"`` with
    task lines off).
    """

    _LEVELS = ("debug", "info", "warning", "error")

    def __init__(
        self, stream: TextIO | None = None, *, min_level: Level = "info", tasks: bool = True
    ) -> None:
        super().__init__(stream)
        self.min_level = min_level
        self.show_tasks = tasks

    def start(self, task: str, *, total: int | None = None, unit: str = "B") -> None:
        self._begin(task, total, unit)
        if self.show_tasks:
            size = f" ({format_amount(total, unit)})" if total is not None else ""
            self._write(f"start {task}{size}")

    def reset(self, task: str) -> None:
        self._zero(task)

    def done(self, task: str) -> None:
        state = self._end(task)
        if self.show_tasks and state is not None:
            elapsed_s = time.monotonic() - state.started_s
            self._write(
                f"done  {task} ({format_amount(state.completed, state.unit)} in {elapsed_s:.1f} s)"
            )

    def log(self, msg: str, *, level: Level = "info", **fields: Any) -> None:
        if self._LEVELS.index(level) < self._LEVELS.index(self.min_level):
            return
        prefix = "" if level == "info" else f"{level}: "
        self._write(prefix + msg)

    def _write(self, line: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        with self._lock:
            self.stream.write(f"{stamp} {line}\n")
            self.stream.flush()


class JsonProgress(_Counting):
    """One JSON object per line: ``{"time", "event", ...}``; events are start, done, log.

    ``advance`` is not emitted (it would flood the stream); ``done`` carries the amount.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)

    def start(self, task: str, *, total: int | None = None, unit: str = "B") -> None:
        self._begin(task, total, unit)
        self._emit({"event": "start", "task": task, "total": total, "unit": unit})

    def reset(self, task: str) -> None:
        self._zero(task)
        self._emit({"event": "reset", "task": task})

    def done(self, task: str) -> None:
        state = self._end(task)
        if state is not None:
            elapsed_s = round(time.monotonic() - state.started_s, 3)
            self._emit(
                {
                    "event": "done",
                    "task": task,
                    "completed": state.completed,
                    "unit": state.unit,
                    "elapsed_s": elapsed_s,
                }
            )

    def log(self, msg: str, *, level: Level = "info", **fields: Any) -> None:
        self._emit({"event": "log", "level": level, "msg": msg, **fields})

    def _emit(self, obj: dict[str, Any]) -> None:
        line = json.dumps(
            {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **obj}, default=str
        )
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class RichProgress(_Base):
    """Live bars on a terminal; log lines print above them. Bytes show as sizes and speed."""

    def __init__(self, stream: TextIO | None = None, *, console: Console | None = None) -> None:
        self.console = console or Console(file=stream if stream is not None else sys.stderr)
        self._bars = RichBars(
            # a label is at most _LABEL_CHARS (_short_label), cut further on a narrow
            # terminal rather than wrapping every bar
            TextColumn(
                "[bold]{task.description}",
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=_LABEL_CHARS),
            ),
            BarColumn(),
            # on a narrow terminal the bar shrinks, not "855.6 MB / 1.9 GB" onto two lines
            _AmountColumn(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
            console=self.console,
        )
        self._ids: dict[str, Any] = {}
        self._totals: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self._started = False

    def __enter__(self):
        self._bars.start()
        self._started = True
        return self

    def close(self) -> None:
        if self._started:
            self._bars.stop()
            self._started = False

    def start(self, task: str, *, total: int | None = None, unit: str = "B") -> None:
        with self._lock:
            self._totals[task] = total
            if task in self._ids:
                self._bars.reset(self._ids[task], total=total, unit=unit)
            else:
                label = escape(_short_label(task))  # a name with [brackets] is not markup
                self._ids[task] = self._bars.add_task(label, total=total, unit=unit)

    def advance(self, task: str, n: int) -> None:
        task_id = self._ids.get(task)
        if task_id is not None:
            self._bars.advance(task_id, n)

    def reset(self, task: str) -> None:
        task_id = self._ids.get(task)
        if task_id is not None:
            self._bars.update(task_id, completed=0)

    def done(self, task: str) -> None:
        """A finished bar leaves the display (the log lines say what was done), so a build
        does not end with a screenful of full bars."""
        with self._lock:
            task_id = self._ids.pop(task, None)
            total = self._totals.pop(task, None)
        if task_id is not None:
            if total is not None:
                self._bars.update(task_id, completed=total)
                self._bars.refresh()  # shown full once, then gone
            self._bars.remove_task(task_id)

    def log(self, msg: str, *, level: Level = "info", **fields: Any) -> None:
        style = {"warning": "yellow", "error": "bold red", "debug": "dim"}.get(level, "")
        text = escape(msg if level == "info" else f"{level}: {msg}")
        self.console.print(f"[{style}]{text}[/]" if style else text)


_LABEL_CHARS = 40


def _short_label(task: str, width: int = _LABEL_CHARS) -> str:
    """``task`` in at most ``width`` characters, keeping both ends: the file and the
    member's own name (cut at the end, every member of a population tgz read
    "A1_NAT4_ozgf.fs100.ch18.tgz:A1_NAT4_ozgf_fs100_…")."""
    if len(task) <= width:
        return task
    head = (width - 1) * 2 // 5
    return f"{task[:head]}…{task[len(task) - (width - 1 - head) :]}"


class _AmountColumn(ProgressColumn):
    """``12.3/30.0 MB`` for byte tasks, ``3/7 files`` for counted ones."""

    def render(self, task: Any) -> Text:
        unit = task.fields.get("unit", "B")
        done = format_amount(int(task.completed), unit)
        if task.total is None:
            return Text(done)
        return Text(f"{done} / {format_amount(int(task.total), unit)}")


def format_amount(n: int | None, unit: str = "B") -> str:
    """Human amount: decimal sizes for bytes (``30.0 MB``), ``N unit`` otherwise."""
    if n is None:
        return "?"
    if unit != "B":
        return f"{n} {unit}"
    size = float(n)
    for suffix in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or suffix == "TB":
            return f"{int(size)} B" if suffix == "B" else f"{size:.1f} {suffix}"
        size /= 1000
    raise AssertionError("unreachable")


def make_progress(mode: Mode = "auto", *, stream: TextIO | None = None) -> Progress:
    """The progress renderer for ``mode``; ``auto`` is rich when stdout and ``stream`` are
    TTYs, plain otherwise.

    Output goes to ``stream`` (default ``sys.stderr``, keeping stdout for results).
    Use the result as a context manager: ``with make_progress() as progress: ...``.
    """
    stream = stream if stream is not None else sys.stderr
    if mode == "auto":
        # bars only for a person at a terminal: under cron, CI or `> log` stdout is not one
        mode = "rich" if _isatty(stream) and _isatty(sys.stdout) else "plain"
    if mode == "rich":
        return RichProgress(stream)
    if mode == "plain":
        return PlainProgress(stream)
    if mode == "json":
        return JsonProgress(stream)
    if mode == "quiet":
        return PlainProgress(stream, min_level="warning", tasks=False)
    raise ValueError(f"progress mode {mode!r}; expected auto, rich, plain, json or quiet")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
