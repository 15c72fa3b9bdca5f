"""A command that fails says why in one line, on real faults (issue 22).

A full disk is a real write to /dev/full (or a tiny tmpfs, as root), a read-only path a
read-only tmpfs (as root; for another user a directory without write permission), a corrupt
database a file of garbage bytes, a busy one a second process holding DuckDB's write lock.
The commands run as `python -m tokenclean.cli` subprocesses: what a user sees, exit code and all.
"""
from __future__ import annotations

import errno
import gc
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tokenclean.cli import _closing_report
from tokenclean.config import RunConfig
from tokenclean.errors import describe_error
from tokenclean.tasks import store


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenclean.cli", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


def _one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with a real (empty) tokenclean database."""
    run = tmp_path / "run"
    store.connect(run / "tokenclean.duckdb").close()
    return run


@pytest.fixture
def holder(run_dir):
    """A second process holding the run database's write lock until the test ends."""
    code = ("import sys; from tokenclean.tasks.store import connect; "
            f"con = connect({str(run_dir / 'tokenclean.duckdb')!r}); print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path``; False where this user may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """(a directory no write reaches, the cause a write there gets)."""
    path = tmp_path / "ro"
    if _mount_tmpfs(path, "ro,size=1m"):
        yield path, os.strerror(errno.EROFS)
        subprocess.run(["umount", str(path)], check=True)
    else:  # not root: the permission bits stop the write (they do not stop root)
        path.chmod(0o555)
        yield path, os.strerror(errno.EACCES)
        path.chmod(0o755)


@pytest.fixture
def full_fs(tmp_path):
    """A tiny tmpfs that a write of 1 MB fills (root only)."""
    path = tmp_path / "full"
    if not _mount_tmpfs(path, "size=256k"):
        pytest.skip("mounting a tmpfs needs root")
    yield path
    gc.collect()  # a failed torch.save leaves its file open until its writer is collected
    if subprocess.run(["umount", str(path)]).returncode:
        subprocess.run(["umount", "-l", str(path)], check=True)  # a failed test may still hold that file


def test_disk_full_names_the_cause_and_the_file(run_dir, tmp_path):
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    out = tmp_path / "report.html"
    # report writes OUT.tmp and renames it: that temporary is a link to /dev/full, so the write gets a real ENOSPC
    (tmp_path / "report.html.tmp").symlink_to("/dev/full")
    line = _one_line_error(_cli("report", str(run_dir), "--out", str(out)))
    assert line == f"error: No space left on device: {out}"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_torch_save_on_a_full_disk_names_the_cause_and_the_file(full_fs):
    import torch

    target = full_fs / "optimizer.pt"
    with pytest.raises(RuntimeError) as e:  # torch's error names neither the file nor the errno
        torch.save(torch.zeros(250_000), target)
    assert "No space left" not in str(e.value)
    assert describe_error(e.value) == (2, f"No space left on device: {target}")
    # as it comes back from a Ray worker: no frames to read the file from, the command's own paths instead
    remote = RuntimeError(str(e.value))
    assert describe_error(remote, writes=(full_fs,)) == (2, f"No space left on device: {full_fs}")


def test_read_only_path_names_the_cause_and_the_file(run_dir, read_only_dir):
    path, cause = read_only_dir
    line = _one_line_error(_cli("report", str(run_dir), "--out", str(path / "report.html")))
    assert line == f"error: {cause}: {path / 'report.html.tmp'}"


def test_corrupt_database_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenclean.duckdb").write_bytes(os.urandom(16384))
    for cmd in ("inspect", "report"):
        line = _one_line_error(_cli(cmd, str(run)))
        assert line == ("error: not a valid DuckDB database (corrupt, or another kind of file): "
                        f"{run / 'tokenclean.duckdb'}"), cmd


def test_busy_database_is_named(run_dir, holder):
    for cmd in ("inspect", "report"):
        line = _one_line_error(_cli(cmd, str(run_dir)))
        assert line.startswith(f"error: database busy: {run_dir / 'tokenclean.duckdb'}"), (cmd, line)


def test_unknown_error_is_one_line_with_its_type_and_debug_shows_the_traceback(tmp_path):
    import duckdb

    db = tmp_path / "other.duckdb"  # a DuckDB database that tokenclean did not write: its tables are missing
    duckdb.connect(str(db)).close()
    line = _one_line_error(_cli("inspect", str(db)), code=1)
    assert line.startswith("error: CatalogException: ") and line.endswith("(re-run with --debug for the traceback)")
    for res in (_cli("--debug", "inspect", str(db)), _cli("inspect", str(db), env={"TOKENCLEAN_DEBUG": "1"})):
        assert res.returncode == 1 and "Traceback" in res.stderr, res.stderr


def test_errors_are_classified_through_their_chain(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenclean.config import parse_overrides

    def raised(fn) -> BaseException:
        try:
            fn()
        except Exception as e:
            return e
        raise AssertionError("no error")

    def write_full():
        with open("/dev/full", "w") as f:
            f.write("x")

    def wrapped():
        try:
            write_full()
        except OSError as e:
            raise RuntimeError("scoring failed") from e

    enospc = os.strerror(errno.ENOSPC)
    assert describe_error(raised(write_full)) == (2, enospc)
    assert describe_error(raised(wrapped), writes=(tmp_path,)) == (2, f"{enospc}: {tmp_path}")
    # pyarrow's errno, as a shard write gets it (a stream, not a path: write_table deletes a path it failed on)
    with pa.OSFile("/dev/full", "wb") as sink:
        assert describe_error(raised(lambda: pq.write_table(pa.table({"a": list(range(100_000))}), sink))) == (
            2, enospc)
    assert describe_error(raised(lambda: open(tmp_path / "missing"))) == (
        2, f"No such file or directory: {tmp_path / 'missing'}")
    # tokenclean's own refusal: exit 2 with its message; a library's ValueError is not the user's to act on
    assert describe_error(raised(lambda: parse_overrides(["novalue"])))[0] == 2
    assert describe_error(raised(lambda: int("x"))) == (1, "ValueError: invalid literal for int() with base 10: 'x'")
    assert describe_error(raised(lambda: {}["k"])) == (1, "KeyError: 'k'")


def test_closing_report_of_a_finished_run_is_a_warning_when_the_database_is_busy(run_dir, holder, capsys):
    cfg = RunConfig(name=run_dir.name, workdir=str(run_dir.parent))
    _closing_report(cfg)  # the flows finished; another process took the lock before the summary was printed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the run finished and its results are stored"), err
    assert "database busy" in err[0] and f"`tokenclean inspect {run_dir}`" in err[0]
