"""Output safety: every file a run writes is checked against every file it reads, then committed.

An :class:`OutputPlan` knows the inputs (the model, its external-data files, ``--data``, the
recipe) and the outputs (models and their ``.data`` files, the report, the plot, a sweep folder).
The rules:

- No output may be an input, or another output: paths are compared after following symlinks
  and relative parts, and by inode (hard links), whether the files exist yet or not.
- Every path is checked before any work (:meth:`OutputPlan.check`); then :meth:`OutputPlan.open`
  makes one hidden staging folder per output folder, and writers write there.
- :meth:`OutputPlan.commit` renames the staged files into place; when any step fails, the
  renames done are undone and nothing new is left behind (:meth:`OutputPlan.discard`).
- A symlink target is written through (the link stays); an existing FIFO or device, or a file
  reached through ``/dev/stdout``-like links, is written into (appended to), never replaced.
- New files get the user's umask; a replaced file keeps its mode.

Errors are one-line :class:`~onnxprune.errors.ModelSaveError` naming the option and the path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from onnxprune.errors import ModelSaveError

STAGE_PREFIX = ".onnxprune-"
FD_ROOTS = ("/proc/", "/dev/fd/")
FD_LINKS = ("/dev/stdin", "/dev/stdout", "/dev/stderr")


@dataclass(eq=False)
class Target:
    """One output file: the option that named it, the path as given, and where it is written."""

    option: str
    path: Path
    what: str
    real: Path
    in_place: bool = False
    optional: bool = False  # committed only when the writer made it (a model's .data file)
    owner: Target | None = None  # the model a .data file belongs to
    staged: Path | None = None
    written: bool = False

    def describe(self) -> str:
        """``-o out.onnx`` or ``-o out.onnx (its external data out.onnx.data)``."""
        if self.owner is not None:
            return f"{self.owner.describe()} (its {self.what} {self.path})"
        return f"{self.option} {self.path}" if self.option else str(self.path)

    @property
    def choose(self) -> str:
        """What to do instead, for the end of an error message."""
        return f"choose another {self.option}" if self.option else "choose another path"


def real_path(path: Path) -> Path:
    """``path`` absolute, with symlinks and ``..`` resolved (also when it does not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def is_stdout(path: str | os.PathLike[str]) -> bool:
    """``-``, or a path to the file this process's stdout is (``/dev/stdout``, a pipe, a tty)."""
    if str(path) == "-":
        return True
    try:
        a, b = os.stat(path), os.fstat(1)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _in_place(path: Path) -> bool:
    """Written into rather than replaced: an existing FIFO or device, or an open file reached
    through ``/dev/stdout``, ``/dev/fd/N`` or ``/proc/.../fd/N`` (never renamed over)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if stat.S_ISDIR(mode):
        return False
    return not stat.S_ISREG(mode) or _through_fd_link(path)


def _is_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _through_fd_link(path: Path) -> bool:
    """Whether ``path`` or a symlink it leads through names a file descriptor."""
    p = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on a chain of links
        if p.startswith(FD_ROOTS) or p in FD_LINKS:
            return True
        if not os.path.islink(p):
            return False
        p = os.path.abspath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return False


@dataclass
class _Input:
    label: str
    path: Path
    real: Path
    identity: tuple[int, int] | None


@dataclass
class _Folder:
    option: str
    path: Path
    created: bool = False


@dataclass
class OutputPlan:
    """The inputs and outputs of one run; checks aliasing, stages writes, commits them at once."""

    inputs: list[_Input] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    folders: list[_Folder] = field(default_factory=list)
    _stages: dict[str, Path] = field(default_factory=dict)  # output folder -> staging folder
    _mode: int = 0o644  # a new file's mode under the user's umask (read off a reserved file)

    # --- what the run reads and writes ---------------------------------------------------------

    def add_input(self, label: str, path: str | os.PathLike[str] | None) -> None:
        """A file the run reads (``label`` e.g. "the input model"); no output may be it."""
        if path is None:
            return
        path = Path(path)
        self.inputs.append(_Input(label, path, real_path(path), _identity(path)))

    def add_output(
        self, option: str, path: str | os.PathLike[str], what: str, *, optional: bool = False
    ) -> Target:
        """A file the run writes; ``option`` (e.g. "--report") names it in errors."""
        path = Path(path)
        target = Target(option, path, what, real_path(path), _in_place(path), optional)
        self.targets.append(target)
        return target

    def add_model(
        self, option: str, path: str | os.PathLike[str], external_data: bool | None
    ) -> Target:
        """A model file, and its ``NAME.data`` unless ``external_data`` is False."""
        target = self.add_output(option, path, "model")
        if target.in_place:
            if external_data:
                raise ModelSaveError(
                    f"{target.describe()}: external data needs a regular file path; "
                    f"{target.choose} or drop --external-data"
                )
            return target
        if external_data is not False:
            data = self.add_output(
                option, Path(f"{target.path}.data"), "external data", optional=True
            )
            data.real = target.real.with_name(f"{target.real.name}.data")
            data.owner = target
        return target

    def add_folder(self, option: str, path: str | os.PathLike[str]) -> None:
        """A folder that outputs go in; created (and removed again on failure) when missing."""
        self.folders.append(_Folder(option, Path(path)))

    def target(self, path: str | os.PathLike[str]) -> Target:
        """The target added for ``path``."""
        real = real_path(Path(path))
        for t in self.targets:
            if t.real == real and t.owner is None:
                return t
        raise KeyError(str(path))

    # --- checks ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise a one-line :class:`ModelSaveError` for the first unsafe or unwritable output."""
        for folder in self.folders:
            self._check_folder(folder)
        planned = {real_path(f.path) for f in self.folders}
        seen: dict[Path, Target] = {}
        ids: dict[tuple[int, int], Target] = {}
        for t in self.targets:
            ident = _identity(t.real)
            self._check_inputs(t, ident)
            if t.in_place and _is_char_device(t.real):
                continue  # /dev/null, a tty: several outputs may share it
            other = seen.get(t.real) or (ids.get(ident) if ident else None)
            if other is not None:
                raise ModelSaveError(
                    f"{t.describe()}: is the same file as {other.describe()}; "
                    "give each output its own path"
                )
            seen[t.real] = t
            if ident:
                ids[ident] = t
            if t.owner is None:
                self._check_file(t, planned)

    def _check_inputs(self, t: Target, ident: tuple[int, int] | None) -> None:
        for i in self.inputs:
            if i.real == t.real or (ident is not None and ident == i.identity):
                raise ModelSaveError(
                    f"{t.describe()}: refusing to overwrite {i.label} ({i.path}); {t.choose}"
                )

    def _check_folder(self, folder: _Folder) -> None:
        where = f"{folder.option} {folder.path}"
        try:
            if folder.path.is_dir():
                return
            exists, parent = folder.path.exists(), folder.path.resolve().parent
            parent_ok = parent.is_dir()
        except OSError as exc:
            raise ModelSaveError(f"{where}: cannot use the folder: {exc.strerror or exc}") from exc
        if exists:
            raise ModelSaveError(f"{where}: is a file, not a folder; give a folder path")
        if not parent_ok:
            raise ModelSaveError(
                f"{where}: cannot create the folder: {parent} does not exist; create it first"
            )

    def _check_file(self, t: Target, planned: set[Path]) -> None:
        if t.in_place:
            return
        folder = t.real.parent
        try:
            is_dir = t.real.is_dir()
            folder_ok = folder.is_dir() or folder in planned
        except OSError as exc:  # e.g. a name too long for the file system
            raise ModelSaveError(
                f"{t.describe()}: cannot write the {t.what}: {exc.strerror or exc}"
            ) from exc
        if is_dir:
            raise ModelSaveError(
                f"{t.describe()}: is a folder; give a file name for the output {t.what}"
            )
        if not folder_ok:
            raise ModelSaveError(
                f"{t.describe()}: output folder {t.path.parent} does not exist; "
                f"create it or {t.choose}"
            )

    # --- staging and commit ---------------------------------------------------------------------

    def open(self) -> None:
        """Check, create missing folders and the staging folders, and reserve every file name."""
        self.check()
        where = ""
        try:
            for folder in self.folders:
                where = f"{folder.option} {folder.path}: cannot create the folder"
                if not folder.path.is_dir():
                    folder.path.mkdir()
                    folder.created = True
            for t in self.targets:
                where = f"{t.describe()}: cannot write the {t.what}"
                t.staged = self._stage_for(t) / t.real.name
                if not t.optional:  # an early, clear error for a name the folder cannot hold
                    os.close(os.open(t.staged, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                    self._mode = stat.S_IMODE(os.stat(t.staged).st_mode)
        except OSError as exc:
            self.discard()
            raise ModelSaveError(f"{where}: {exc.strerror or exc}") from exc

    def _stage_for(self, t: Target) -> Path:
        """The staging folder beside ``t`` (its own, in the temp folder, for a FIFO or device)."""
        key = f"in place {id(t)}" if t.in_place else str(t.real.parent)
        if key not in self._stages:
            folder = tempfile.gettempdir() if t.in_place else t.real.parent
            self._stages[key] = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder))
        return self._stages[key]

    def write(self, target: Target, writer: Callable[[Path], object]) -> None:
        """Run ``writer`` on ``target``'s staged path (moved into place by :meth:`commit`).

        Raises:
            ModelSaveError: the writer failed with an OSError (disk full...).
        """
        if target.staged is None:
            raise RuntimeError("OutputPlan.write before open()")
        try:
            writer(target.staged)
        except OSError as exc:
            raise ModelSaveError(
                f"{target.describe()}: cannot write the {target.what}: {exc.strerror or exc}"
            ) from exc
        target.written = True

    def commit(self) -> None:
        """Move every written file into place; on any failure undo and raise ModelSaveError."""
        todo = [t for t in self.targets if _to_commit(t)]
        done: list[_Done] = []
        where = "output"
        try:
            for t in todo:
                where = f"{t.describe()}: cannot write the {t.what}"
                if t.in_place:  # first: a FIFO or device can fail (no reader); renames rarely do
                    _write_into(t)
            for t in todo:
                where = f"{t.describe()}: cannot write the {t.what}"
                if not t.in_place:
                    done.append(_replace(t, self._mode))
        except (OSError, ModelSaveError) as exc:
            for d in reversed(done):
                d.undo()
            self.discard()
            if isinstance(exc, ModelSaveError):
                raise
            raise ModelSaveError(f"{where}: {exc.strerror or exc}") from exc
        self._remove_stages()

    def discard(self) -> None:
        """Remove the staging folders and the folders this plan created (nothing is committed)."""
        self._remove_stages()
        for folder in self.folders:
            if folder.created:
                with contextlib.suppress(OSError):
                    folder.path.rmdir()
                folder.created = False

    def _remove_stages(self) -> None:
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()

    def __enter__(self) -> OutputPlan:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _to_commit(t: Target) -> bool:
    """Written by its writer; a model's .data file only when the model writer made one."""
    if t.staged is None:
        return False
    if t.owner is not None:
        return t.owner.written and t.staged.exists()
    return t.written


def _write_into(t: Target) -> None:
    """Copy a staged file into an existing FIFO or device, appending (never truncating)."""
    assert t.staged is not None
    if t.owner is None and t.staged.with_name(f"{t.staged.name}.data").exists():
        raise ModelSaveError(
            f"{t.describe()}: the model needs external data (over 2 GB), which needs a "
            f"regular file path; {t.choose}"
        )
    fd = os.open(t.real, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "wb") as dst, open(t.staged, "rb") as src:
        shutil.copyfileobj(src, dst)


@dataclass
class _Done:
    """A rename done by the commit: the file it created, or the hard-link backup it replaced."""

    real: Path
    created: bool
    backup: Path | None

    def undo(self) -> None:
        with contextlib.suppress(OSError):
            if self.created:
                os.unlink(self.real)
            elif self.backup is not None:
                os.replace(self.backup, self.real)


def _replace(t: Target, new_mode: int) -> _Done:
    """Rename the staged file onto ``t.real``: a new file gets ``new_mode`` (onnx writes
    external data as 0600), a replaced one keeps its mode."""
    assert t.staged is not None
    try:
        old = os.stat(t.real)
    except FileNotFoundError:
        os.chmod(t.staged, new_mode)
        os.replace(t.staged, t.real)
        return _Done(t.real, created=True, backup=None)
    os.chmod(t.staged, stat.S_IMODE(old.st_mode))
    backup: Path | None = None
    candidate = t.staged.with_name(f".backup.{t.staged.name}")
    try:
        os.link(t.real, candidate)
        backup = candidate
    except OSError:
        pass  # a file system without hard links: the old file cannot come back
    os.replace(t.staged, t.real)
    return _Done(t.real, created=False, backup=backup)


def write_file(path: str | os.PathLike[str], what: str, data: bytes) -> Path:
    """Write ``data`` to ``path`` by the rules above (a plan of one file, ``what`` e.g. "report")."""
    plan = OutputPlan()
    target = plan.add_output("", path, what)
    with plan:
        plan.write(target, lambda p: p.write_bytes(data))
    return Path(path)
