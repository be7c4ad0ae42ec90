"""Output directories that appear whole or not at all, and replace only a previous output of vllm-spon.

What counts as a previous output is the caller's `replaceable` test: by default a folder carrying the
`.vllm-spon` marker; for checkpoints, any folder holding `spon/config.json` (`is_spon_checkpoint`).
A directory is written as a hidden temporary sibling of its final path, marked unfinished, flushed to disk
and renamed into place at the end; with `overwrite`, the previous output is swapped out and deleted only
after the new one is in place on disk. SIGINT and SIGTERM become `Interrupted` (under `interruptible()`), so
the temporary is removed on the way out; during the final renames they are deferred, so no run ends between
them, and the `Interrupted` raised after them names the output now in place (`written`). A temporary left by
a killed run (SIGKILL, power loss) is marked unfinished, so no tool takes it for a finished output, and the
next write to the same path deletes it once the process that made it is gone.
"""

import glob
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("vllm_spon.format")

# In every finished output directory: the default test (`written_by_vllm_spon`) of what `overwrite` may replace;
# checkpoints are judged by `is_spon_checkpoint` instead.
OWNER_MARKER = ".vllm-spon"
# In a temporary directory until it is renamed into place: {"pid": ..., "host": ...} of the writer.
UNFINISHED_MARKER = ".vllm-spon-unfinished"
_TMP_INFIX = ".vllm-spon-tmp."
_OLD_INFIX = ".vllm-spon-old."
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OutputError(ValueError):
    """An output path cannot be written without losing something the user owns, or cannot be written at all."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwinds like Ctrl-C so temporaries are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        # The output the final renames had put in place, whole, when the signal was delivered (else None):
        # the run was interrupted, but its output was written and any previous one is gone.
        self.written: Path | None = None


def written_by_vllm_spon(path: Path) -> bool:
    """A finished output directory of vllm-spon (what `overwrite` may replace)."""
    return path.is_dir() and not path.is_symlink() and (path / OWNER_MARKER).is_file()


def unfinished(path: Path) -> bool:
    """A temporary of an interrupted or running write: never a finished output."""
    return (Path(path) / UNFINISHED_MARKER).exists()


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `Interrupted` (main thread only), restoring the previous handlers after."""
    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, raise_interrupted) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _signals_deferred(written: Path) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (a rename pair must not be split), then deliver them; if
    the block completed, the `Interrupted` they raise names `written`, so no one takes it for still absent.

    A Python handler, not a signal mask: process signals may land on any of torch's threads, but Python
    handlers always run in the main thread, between bytecodes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: arrived.append(signum)) for s in _SIGNALS}
    completed = False
    try:
        yield
        completed = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in arrived[:1]:
            try:
                signal.raise_signal(signum)  # runs the restored handler now, in this thread
            except Interrupted as e:
                if completed:
                    e.written = written
                raise


def _fsync(path: Path, tree: bool = False) -> None:
    """Flush `path` to disk (with `tree`, every file and folder under it too, links not followed: an
    overlay's links name the base model's files). A rename may reach the disk before the data it names, so
    without this a power loss after the previous output is deleted can lose both."""
    paths = [path]
    if tree:
        paths += [p for p in path.rglob("*") if not p.is_symlink() and (p.is_file() or p.is_dir())]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def clean_stale_temporaries(final: Path) -> None:
    """Delete temporaries of `final` whose writer (on this host) is gone; name any others in a warning."""
    if not final.parent.is_dir():
        return
    prefix = glob.escape(f".{final.name}")
    for item in sorted([*final.parent.glob(f"{prefix}{_TMP_INFIX}*"), *final.parent.glob(f"{prefix}{_OLD_INFIX}*")]):
        try:
            writer = json.loads((item / UNFINISHED_MARKER).read_text())
        except (OSError, ValueError):
            writer = {}
        pid = writer.get("pid")
        if writer.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            shutil.rmtree(item, ignore_errors=True)
            logger.info(f"removed {item}, left by an interrupted vllm-spon run (pid {pid})")
        else:
            logger.warning(f"{item} looks like a temporary of another vllm-spon run writing {final}; "
                           "delete it if no such run is going on")


def _mark_unfinished(directory: Path) -> None:
    (directory / UNFINISHED_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def writable_folder(path: Path, option: str) -> Path:
    """The nearest existing folder above `path`, checked to take a new entry (a real try, not permission
    bits, so root and read-only file systems are judged right)."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot create a directory in {parent} ({e.strerror}); "
                          f"choose a writable {option}") from None
    return parent


def check_target(final: Path, overwrite: bool, replaceable: Callable[[Path], bool] = written_by_vllm_spon,
                 what: str = "a previous output of vllm-spon") -> None:
    """Refuse an existing `final` unless `overwrite` and `replaceable(final)`: a file, a link or a folder of
    the user's is never replaced."""
    final = Path(final)
    if not (final.is_symlink() or final.exists()):
        return
    if not overwrite:
        raise OutputError(f"{final} already exists; choose another output or pass --overwrite")
    if final.is_symlink() or not final.is_dir() or not replaceable(final):
        kind = ("a symbolic link" if final.is_symlink() else "a file" if not final.is_dir() else
                f"a directory that is not {what}")
        raise OutputError(f"{final} is {kind}; --overwrite replaces only {what}, so choose another output "
                          "(or move it away yourself)")


@contextmanager
def atomic_directory(
    final: Path, overwrite: bool = False, replaceable: Callable[[Path], bool] = written_by_vllm_spon,
    what: str = "a previous output of vllm-spon",
) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success rename it into place, on failure delete it.

    An existing `final` is replaced only with `overwrite` and only if `replaceable(final)` (`check_target`).
    """
    final = Path(final).absolute()
    check_target(final, overwrite, replaceable, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_INFIX}{os.getpid()}.", dir=final.parent))
    try:
        _mark_unfinished(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should not be
        yield tmp
        (tmp / OWNER_MARKER).write_text("written by vllm-spon\n")
        _fsync(tmp, tree=True)  # the long part, before the deferral: a signal here still leaves nothing
        with _signals_deferred(final):
            (tmp / UNFINISHED_MARKER).unlink()
            _fsync(tmp)  # the marker's removal too, or a power loss could leave the output marked unfinished
            # Where the previous output is swapped out to: unique, as tmp's name is.
            old = tmp.with_name(tmp.name.replace(_TMP_INFIX, _OLD_INFIX)) if final.exists() else None
            if old:
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync(final.parent)  # the renames are on disk before the previous output is deleted
            if old:
                _mark_unfinished(old)
                try:
                    shutil.rmtree(old)
                except OSError as e:
                    logger.warning(f"wrote {final}, but could not delete the previous output, moved to {old} "
                                   f"({e}); delete it")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once tmp is renamed into place (`Interrupted.written`)
        raise
