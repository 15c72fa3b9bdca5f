"""An error that ends a command, said in one line: the cause a user can act on (exit 2), or the error's type (1)."""
from __future__ import annotations

import errno
import os
import re
import reprlib
from pathlib import Path

# Causes in the environment, not in tokenclean: said in one line, exit 2.
_ENV_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
_QUOTED_FILE = re.compile(r'file "([^"]+)"')  # how DuckDB names the file in its errors
_LOW_SPACE = 64 << 20  # below this much free space, a write that failed without its errno is put down to a full disk


def _chain(exc: BaseException):
    """``exc`` and what caused it: ``__cause__``/``__context__``, and the remote error a Ray task error carries."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        remote = getattr(e, "cause", None)
        todo += [e.__cause__, e.__context__, *([remote] if isinstance(remote, BaseException) else [])]


def one_line(text) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def _torch_save_target(exc: BaseException) -> Path | None:
    """The file a failed ``torch.save`` was writing, read from its frame (torch's error names no file)."""
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "save" and code.co_filename.endswith(os.path.join("torch", "serialization.py")):
                f = tb.tb_frame.f_locals.get("f")
                if isinstance(f, (str, os.PathLike)):
                    return Path(f)
            tb = tb.tb_next
    return None


def _fs_cause(paths) -> tuple[str, Path] | None:
    """Why writes under one of ``paths`` fail, read from its file system, for an error that lost its errno."""
    for path in paths:
        p = Path(path)
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS), Path(path)
        if (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize < _LOW_SPACE:
            return os.strerror(errno.ENOSPC), Path(path)
        if not os.access(p if p.is_dir() else p.parent, os.W_OK):
            return os.strerror(errno.EACCES), Path(path)
    return None


def _at(cause: str, where) -> str:
    if not where:
        return cause
    if isinstance(where, (tuple, list)):
        return f"{cause}: {where[0]}" if len(where) == 1 else f"{cause} (writing under {', '.join(map(str, where))})"
    return f"{cause}: {where}"


def _ours(exc: BaseException) -> bool:
    """Raised by tokenclean's own code (its validation), not by a library it called."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("tokenclean")


def describe_error(exc: BaseException, db=None, writes=()) -> tuple[int, str]:
    """(exit code, one line) for an error that ends a command.

    2 and the cause for what the user can act on: a full disk, a read-only or forbidden path (errno anywhere
    in the error's chain, or its text where a library kept only that: DuckDB, safetensors, torch.save), a
    corrupt or busy database, a missing file, a refusal by tokenclean's own validation. 1 and the error's
    type for anything else. ``db``, ``writes``: the command's database and where it writes (``_where``),
    named when the error itself names no file.
    """
    from pydantic import ValidationError

    from tokenclean.tasks.store import DatabaseBusy, SchemaMismatch

    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, (DatabaseBusy, SchemaMismatch)):
            return 2, one_line(e)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
            return 2, one_line(_at(os.strerror(e.errno), e.filename or _torch_save_target(exc) or writes))
    for e in chain:  # the errno survives only as text: DuckDB, safetensors ("(os error 28)"), torch ("strerror: ...")
        text = one_line(e)
        m = re.search(r"\(os error (\d+)\)", text)
        cause = os.strerror(int(m.group(1))) if m and int(m.group(1)) in _ENV_ERRNOS else next(
            (os.strerror(n) for n in _ENV_ERRNOS if os.strerror(n) in text), None)
        if cause:
            m = _QUOTED_FILE.search(text)
            return 2, _at(cause, m.group(1) if m else _torch_save_target(exc) or writes)
    for e in chain:
        text = one_line(e)
        if "not a valid DuckDB database" in text:
            m = _QUOTED_FILE.search(text)
            return 2, f"not a valid DuckDB database (corrupt, or another kind of file): {m.group(1) if m else db}"
        if "Corrupt database file" in text:
            return 2, f"corrupt database{' ' + str(db) if db else ''}: {text}"
        if "inline_container" in text or "file write failed" in text:  # torch.save lost the errno
            target = _torch_save_target(exc)
            found = _fs_cause([target] if target else writes)
            if found:
                return 2, f"{found[0]}: {found[1]}"
            return 2, f"could not write {target or 'a file'} (torch.save: {text}); check its free space and permissions"
    for e in chain:
        if isinstance(e, ValidationError):
            return 2, one_line("; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg'].removeprefix('Value error, ')} "
                f"(got {reprlib.repr(err.get('input'))})" for err in e.errors()))
    if isinstance(exc, FileNotFoundError):
        return 2, one_line(_at(os.strerror(exc.errno), exc.filename) if exc.filename else exc)
    if isinstance(exc, ValueError) and _ours(exc):
        return 2, one_line(exc)
    return 1, one_line(f"{type(exc).__name__}: {exc}")
