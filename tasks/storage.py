"""Where workers put what they compute: a local directory, an NFS mount, or an fsspec URL (``storage:``).

Scoring workers write each shard's losses here, atomically, under the scorer's key, and hand back only the path,
so per-token results never pass through the driver. Everything goes through fsspec, so the code that runs on a
laptop is the code that runs against a bucket. The storage roots and the atomic write: docs/design.md ("Storage").
"""
from __future__ import annotations

import contextlib
import os
import uuid

import fsspec


def filesystem(path: str):
    """(fsspec filesystem, path inside it) for a local path or URL."""
    return fsspec.core.url_to_fs(str(path))


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_local(path: str) -> bool:
    return _is_local(filesystem(path)[0])


def local_path(path: str) -> str | None:
    """The path on this machine's filesystem (``file://`` stripped), or None for remote storage."""
    fs, p = filesystem(path)
    return p if _is_local(fs) else None


def shard_path(directory: str, shard: int) -> str:
    """The file of shard number ``shard`` under ``directory`` (``shard_number`` reads it back)."""
    return join(directory, f"shard-{shard:08d}.parquet")


def shard_number(path: str) -> int:
    return int(path.rsplit("/", 1)[1].removeprefix("shard-").removesuffix(".parquet"))


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def write_parquet(table, path: str) -> str:
    """Write ``table`` so that ``path`` holds all of it or nothing (a retried writer replaces it)."""
    with parquet_writer(path, table.schema) as writer:
        writer.write_table(table)
    return path


@contextlib.contextmanager
def parquet_writer(path: str, schema):
    """A ``pyarrow.parquet.ParquetWriter`` whose file appears at ``path`` whole, when the block ends
    without an error, and not at all otherwise: tables written to it stream out as row groups.
    Hand-written: nothing in the stack writes all-or-nothing both by POSIX rename and on object stores."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema, write_page_checksum=True) as writer:
            yield writer
        if _is_local(fs):
            _fsync(tmp)
        fs.mv(tmp, p)
        if _is_local(fs):
            _fsync(parent)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _fsync(path: str) -> None:
    """Flush a local file's data, or a directory's entries, to the disk (fsync works on a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parquet_rows(path: str) -> int:
    """Rows of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def fetch(path: str, local: str) -> str:
    """Copy a (remote) file to the local path ``local``, atomically; returns ``local``."""
    fs, p = filesystem(path)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fs.get(p, tmp)
        _fsync(tmp)
        os.replace(tmp, local)
        _fsync(os.path.dirname(os.path.abspath(local)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return local


def remove_tree(path: str) -> None:
    """Remove a directory and everything under it, if it exists."""
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def require_visible(path: str, what: str, node) -> None:
    """Stop with a clear error when ``path``, which a worker on ``node`` wrote (``what``), is not visible here:
    the default storage (the run directory) on nodes that do not share it loses results otherwise."""
    if not exists(path):
        raise RuntimeError(
            f"{what}: the worker on node {node} wrote it to {path}, which this driver cannot see. On a cluster, "
            "set `storage:` to a location every node and the driver share (an NFS path mounted at the same "
            "place, or an fsspec URL such as s3://bucket/x)")


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def remove(path: str) -> None:
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p)


def shard_files(directory: str) -> list[str]:
    """Complete shard files under ``directory`` (temporary names excluded), sorted, as full paths/URLs."""
    fs, p = filesystem(directory)
    if not fs.exists(p):
        return []
    names = sorted(x for x in fs.glob(f"{p.rstrip('/')}/shard-*.parquet"))
    if _is_local(fs):
        return names
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return [f"{proto}://{x}" for x in names]


def read_table(path: str, columns: list[str] | None = None):
    """A Parquet file's rows; a page whose CRC does not match raises ``OSError`` (pages written without one pass)."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns, page_checksum_verification=True)
