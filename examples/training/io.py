"""The files of a run's output folder: atomic writes, the run lock and validated loaders.

A run writes every file with :func:`atomic_write_text`, :func:`atomic_write_json` or
:func:`atomic_torch_save`: a temporary file beside the target (``.NAME.XXXXXXXX.tmp``), flushed
to disk, then renamed over it, so that a reader sees the old file or the new one, never half of
one. A run owns its output folder while it runs (:class:`RunLock`); only the lock's holder
removes the temporary files a killed run left behind (:func:`remove_stale_temporaries`).

Every file a run reads back goes through a loader that checks it (:func:`load_checkpoint`,
:func:`load_seed_record`, :func:`load_results`, :func:`load_config`): an empty, truncated or
garbled file, or one with the wrong structure, raises :class:`CorruptFileError`, one line that
names the file and what to do. :func:`set_aside` renames such a file out of the way (never
deletes it) so that the run can start that part afresh.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock, the folder is not locked
    fcntl = None

__all__ = [
    "TEMPORARY_SUFFIX",
    "LOCK_NAME",
    "CorruptFileError",
    "OutputFolderBusy",
    "RunLock",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "json_safe",
    "is_temporary",
    "remove_stale_temporaries",
    "set_aside",
    "load_checkpoint",
    "load_json_object",
    "load_seed_record",
    "load_results",
    "load_config",
]

TEMPORARY_SUFFIX = ".tmp"
# the writer's temporaries: "." + target name + "." + mkstemp's 8 random characters + suffix
_TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX) + r"$")
LOCK_NAME = ".run.lock"
CORRUPT_MARK = ".corrupt-"
SET_ASIDE_ADVICE = "move it away, or rerun with --set-aside-corrupt to rename it and train that seed afresh"


class CorruptFileError(ValueError):
    """A file a run reads back is empty, truncated, garbled or of the wrong structure.

    ``path`` names it, ``what`` says what it should be (``"checkpoint"``, ``"seed record"``...),
    ``reason`` what is wrong with it; the message adds what to do about it.
    """

    def __init__(self, path: Union[str, Path], what: str, reason: str, advice: str = SET_ASIDE_ADVICE) -> None:
        self.path, self.what, self.reason, self.advice = Path(path), what, reason, advice
        super().__init__(f"{path}: corrupt {what} ({reason}); {advice}")

    def __reduce__(self):  # raised in worker processes: rebuilt from its parts in the parent
        return type(self), (self.path, self.what, self.reason, self.advice)


class OutputFolderBusy(RuntimeError):
    """Another process holds the output folder's :class:`RunLock`; ``holder`` is what it wrote
    into the lock file (``pid``, ``host``, ``command``, ``started``; empty when unreadable)."""

    def __init__(self, folder: Union[str, Path], holder: Mapping[str, Any]) -> None:
        self.folder, self.holder = Path(folder), dict(holder)
        super().__init__(f"{folder} is in use by another run ({describe_holder(holder)}); wait for it to end or write to another folder")

    def __reduce__(self):
        return type(self), (self.folder, self.holder)


def describe_holder(holder: Mapping[str, Any]) -> str:
    """``pid P on HOST since T: COMMAND`` from a lock file's record (what is known of it)."""
    if not holder.get("pid"):
        return "a process that has not yet written who it is"
    text = f"pid {holder['pid']} on {holder.get('host', '?')}"
    if holder.get("started"):
        text += f" since {holder['started']}"
    if holder.get("command"):
        text += f": {holder['command']}"
    return text


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], write: Callable[[Any], None], *, binary: bool) -> Path:
    """Write to a temporary file beside ``path``, flush it to disk, then ``os.replace`` it.

    A crash or an exception during ``write`` leaves any previous file at ``path`` untouched and
    removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; results are not
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers: an
    undefined metric, e.g. the AUC of a split with one class, is written as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace``)."""
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def atomic_write_json(path: Union[str, Path], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; NaN and Inf become null (:func:`json_safe`)."""
    return atomic_write(path, lambda handle: json.dump(json_safe(obj), handle, indent=1, allow_nan=False), binary=False)


def atomic_torch_save(path: Union[str, Path], obj: Any) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


# ----------------------------------------------------------------------------- the run lock


class RunLock:
    """An advisory lock on an output folder, held for a run's life (a context manager).

    The lock is ``flock`` on ``folder/.run.lock``, which records the holder's pid, host, command
    and start time. A second run that tries to take it gets :class:`OutputFolderBusy` naming the
    holder. The kernel drops the lock when the holder's process ends however it ends (an
    exception, a signal, ``kill -9``), so a crashed run never leaves the folder locked. A run that
    ends normally removes the lock file; one that was killed leaves it, and the next holder takes
    it over. Without ``fcntl`` (Windows) the folder is not locked.

    Args:
        folder: the output folder (created if missing).

    Raises:
        OutputFolderBusy: on entering, when another process holds the lock.
        OSError: when the folder cannot be created or its file system cannot lock.

    Examples:
        >>> with RunLock(output_dir) as lock:  # doctest: +SKIP
        ...     remove_stale_temporaries(output_dir, lock=lock)
        ...     train_and_write()
    """

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self.held:
            raise RuntimeError(f"the lock on {self.folder} is already held by this object")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as err:
                        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                            raise OSError(err.errno, f"cannot lock the output folder {self.folder} ({err.strerror}); use a folder on a local file system") from None
                        raise OutputFolderBusy(self.folder, _read_holder(fd)) from None
                if _same_file(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            # the previous holder removed the file between our open and our lock: lock the new one
            os.close(fd)
        try:
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": shlex.join([sys.executable, *sys.argv]) if sys.argv and sys.argv[0] else sys.executable,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (nothing when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # removed while still locked: a run that opened it meanwhile sees that it is gone and retries
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        named, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _read_holder(fd: int) -> Dict[str, Any]:
    # the holder may be between taking the lock and writing its record: then nothing is known
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        if isinstance(record, dict):
            return record
    return {}


def is_temporary(path: Union[str, Path]) -> bool:
    """Whether ``path``'s name is one the atomic writer gives its temporary files."""
    return _TEMPORARY_NAME.match(Path(path).name) is not None


def remove_stale_temporaries(folder: Union[str, Path], *, lock: RunLock) -> List[Path]:
    """Delete the temporary files an interrupted atomic write left in ``folder``.

    Only the holder of the folder's run lock may call it: no other run writes there then, so
    every file of the writer's own pattern (``.NAME.XXXXXXXX.tmp``) is left over from a run that
    ended while writing. Other files are never touched.

    Args:
        folder: the output folder or one of its subfolders.
        lock: the held :class:`RunLock` of the output folder.

    Raises:
        RuntimeError: when ``lock`` is not held or is the lock of another folder.
    """
    folder = Path(folder)
    if not lock.held:
        raise RuntimeError(f"removing temporaries from {folder} needs the run lock of its output folder, held")
    if lock.folder.resolve() not in (folder.resolve(), *folder.resolve().parents):
        raise RuntimeError(f"{folder} is not inside the locked output folder {lock.folder}")
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if is_temporary(p) and p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def set_aside(path: Union[str, Path]) -> Path:
    """Rename a corrupt file to ``NAME.corrupt-YYYYmmdd-HHMMSS`` beside it (never deletes it).

    A number is appended when that name is taken. Returns the new path.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        target = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}" + (f"-{n}" if n else ""))
        if not target.exists():
            os.rename(path, target)
            return target
    raise FileExistsError(f"no free name to set {path} aside")


# ----------------------------------------------------------------------------- validated loaders


def _problem(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    first = lines[0].split(". ")[0].rstrip(".")  # torch follows the cause with paragraphs of advice
    return f"{type(err).__name__}: {first[:160]}"


def _check_structure(obj: Any, required: Mapping[str, Union[Type, Tuple[Type, ...]]]) -> Optional[str]:
    """What is wrong with ``obj`` as a mapping with ``required`` keys of those types (None: nothing)."""
    if not isinstance(obj, dict):
        return f"holds a {type(obj).__name__}, not a mapping"
    missing = [k for k in required if k not in obj]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, kind in required.items():
        value = obj[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
            names = "/".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            return f"{key} is {type(value).__name__}, not {names}"
    return None


CHECKPOINT_KEYS: Dict[str, Union[Type, Tuple[Type, ...]]] = {
    "fingerprint": str,
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "objective": dict,
    "best_val": dict,
    "best_test": dict,
    "history": dict,
    "torch_rng": torch.Tensor,
}


def load_checkpoint(
    path: Union[str, Path],
    *,
    map_location: Any = None,
    required: Mapping[str, Union[Type, Tuple[Type, ...]]] = CHECKPOINT_KEYS,
    advice: str = SET_ASIDE_ADVICE,
) -> Dict[str, Any]:
    """``torch.load`` a checkpoint and check that it holds the ``required`` entries.

    Args:
        path: the checkpoint.
        map_location: as for ``torch.load``.
        required: key -> type(s) the checkpoint must hold (default: a training checkpoint's).
        advice: what the error tells the user to do.

    Raises:
        CorruptFileError: the file is empty, not a torch file (truncated, garbled) or lacks an entry.
        FileNotFoundError: there is no file at ``path``.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptFileError(path, "checkpoint", "empty file", advice)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except MemoryError:
        raise
    except Exception as err:  # torch and pickle fail in many ways on a damaged file
        raise CorruptFileError(path, "checkpoint", f"unreadable, {_problem(err)}", advice) from None
    wrong = _check_structure(state, required)
    if wrong is not None:
        raise CorruptFileError(path, "checkpoint", wrong, advice)
    return state


def load_json_object(path: Union[str, Path], *, what: str, required: Mapping[str, Union[Type, Tuple[Type, ...]]] = {}, advice: str = SET_ASIDE_ADVICE) -> Dict[str, Any]:
    """Read a JSON file that must hold an object with the ``required`` keys (of those types).

    Args:
        path: the file.
        what: what it is, for the error (``"seed record"``, ``"results file"``, ...).
        required: key -> type(s).
        advice: what the error tells the user to do.

    Raises:
        CorruptFileError: the file is empty, not UTF-8, not JSON (truncated, garbled), not an
            object or lacks a key.
        FileNotFoundError: there is no file at ``path``.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise CorruptFileError(path, what, "empty file", advice)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CorruptFileError(path, what, "not UTF-8 text", advice) from None
    except json.JSONDecodeError as err:
        raise CorruptFileError(path, what, f"not valid JSON at line {err.lineno} column {err.colno}: {err.msg}", advice) from None
    wrong = _check_structure(obj, required)
    if wrong is not None:
        raise CorruptFileError(path, what, wrong, advice)
    return obj


SEED_RECORD_KEYS = {"seed": int, "protocols": dict, "history": dict, "fingerprint": str}
_SEED_FILE = re.compile(r"^seed(?P<seed>\d+)\.json$")


def load_seed_record(path: Union[str, Path], *, advice: str = SET_ASIDE_ADVICE) -> Dict[str, Any]:
    """Read a finished seed's record (``seeds/seed<N>.json``) and check its structure.

    Besides the keys of :data:`SEED_RECORD_KEYS`, the history must list its epochs and a file
    named ``seed<N>.json`` must hold seed N.

    Raises:
        CorruptFileError: as :func:`load_json_object`, or the history or the seed is wrong.
    """
    path = Path(path)
    record = load_json_object(path, what="seed record", required=SEED_RECORD_KEYS, advice=advice)
    if not isinstance(record["history"].get("epoch"), list):
        raise CorruptFileError(path, "seed record", "its history lists no epochs", advice)
    named = _SEED_FILE.match(path.name)
    if named is not None and int(named["seed"]) != record["seed"]:
        raise CorruptFileError(path, "seed record", f"it holds seed {record['seed']}", advice)
    return record


def seed_of_record_file(path: Union[str, Path]) -> Optional[int]:
    """N for a file named ``seed<N>.json``, else None."""
    named = _SEED_FILE.match(Path(path).name)
    return int(named["seed"]) if named is not None else None


RESULTS_KEYS = {"dataset": str, "method": str, "seeds": list, "protocols": dict, "per_seed": list, "config": dict}
REBUILT_ADVICE = "delete it: the next run into this folder writes it again from the seed records"


def load_results(path: Union[str, Path], *, advice: str = REBUILT_ADVICE) -> Dict[str, Any]:
    """Read a run's ``results.json`` and check its structure (keys of :data:`RESULTS_KEYS`).

    Raises:
        CorruptFileError: as :func:`load_json_object`.
    """
    return load_json_object(path, what="results file", required=RESULTS_KEYS, advice=advice)


def load_config(path: Union[str, Path], *, required: Mapping[str, Union[Type, Tuple[Type, ...]]] = {}, advice: str = "fix or rewrite it") -> Dict[str, Any]:
    """Read a configuration file: a JSON object of options, with the ``required`` ones.

    Raises:
        CorruptFileError: as :func:`load_json_object`.
    """
    return load_json_object(path, what="configuration", required=required, advice=advice)
