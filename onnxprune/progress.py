"""The one progress display: the current pass and its work, on one transient line of stderr.

Rules:
    1. One display per command (:func:`display`), opened by the command line only: a rich
       progress line on stderr when stderr is a terminal and ``-q`` is not given. Anywhere
       else (tests, the Python API, a pipe) there is no display and nothing is printed.
    2. The pipeline names each pass (:func:`step`); a pass reports its work through
       :func:`task`, which yields an ``advance()``. Without a display both are no-ops.
    3. One line, readable at 80 columns: the pass's name and the innermost task's
       description, led by the outer ones (a sweep's points, then the pass, then its task),
       then the innermost task's bar, done/total and time left. The line is
       transient: it is gone when the display closes, so nothing stale is left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column

Advance = Callable[..., None]


@dataclass
class _Frame:
    label: str
    row: TaskID | None  # a task's own row; None for a pass


@dataclass
class _Display:
    bar: Progress
    row: TaskID  # the line shown while no task runs
    stack: list[_Frame] = field(default_factory=list)

    def show(self) -> None:
        """Show only the innermost task's row, labelled by every open frame (rule 3)."""
        rows = [f.row for f in self.stack if f.row is not None]
        inner = rows[-1] if rows else self.row
        for row in (self.row, *rows):
            self.bar.update(row, visible=row == inner)
        label = ": ".join(f.label for f in self.stack) or "onnxprune"
        self.bar.update(inner, description=label, refresh=True)

    @contextmanager
    def open(self, frame: _Frame) -> Iterator[None]:
        """``frame`` on top of the stack for the ``with`` block."""
        self.stack.append(frame)
        self.show()
        try:
            yield
        finally:
            self.stack.remove(frame)
            if frame.row is not None:
                self.bar.remove_task(frame.row)
            self.show()


_current: ContextVar[_Display | None] = ContextVar("onnxprune_progress", default=None)


def _no_op(steps: int = 1) -> None:
    """``advance()`` when there is no display."""


def active() -> bool:
    """Whether a display is open in this context."""
    return _current.get() is not None


def stderr_console() -> Console:
    """The console the display draws on by default: stderr (a test may replace this)."""
    return Console(stderr=True)


def _bar(console: Console) -> Progress:
    """The one-line transient bar (rule 3)."""
    return Progress(
        SpinnerColumn(),
        TextColumn(
            "{task.description}",
            table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
        ),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        expand=True,
    )


@contextmanager
def display(*, quiet: bool = False, console: Console | None = None) -> Iterator[None]:
    """Open the display for the ``with`` block (rule 1); a no-op under ``quiet`` or when the
    console (stderr by default) is not a terminal."""
    out = console if console is not None else stderr_console()
    if quiet or not out.is_terminal or _current.get() is not None:
        yield
        return
    bar = _bar(out)
    state = _Display(bar, bar.add_task("onnxprune", total=None))
    token = _current.set(state)
    try:
        with bar:
            yield
    finally:
        _current.reset(token)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Name the current pass on the display for the ``with`` block (rule 2)."""
    state = _current.get()
    if state is None:
        yield
        return
    with state.open(_Frame(name, None)):
        yield


@contextmanager
def task(total: int, what: str) -> Iterator[Advance]:
    """A task of ``total`` steps described by ``what``; yields ``advance(steps=1)`` (rule 2)."""
    state = _current.get()
    if state is None:
        yield _no_op
        return
    row = state.bar.add_task(what, total=max(int(total), 0), visible=False)

    def advance(steps: int = 1) -> None:
        state.bar.advance(row, steps)

    with state.open(_Frame(what, row)):
        yield advance
