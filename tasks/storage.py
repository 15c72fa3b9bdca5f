"""Where workers put what they compute: a local directory, an NFS mount, or an fsspec URL (``storage:``).

Scoring workers write each shard's losses here, atomically, under the scorer's key, and hand back only the path,
so per-token results never pass through the driver. Everything goes through fsspec, so the code that runs on a
laptop is the code that runs against a bucket. The storage roots and the atomic write: docs/design.md ("Storage").
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

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


# A directory in object storage is whole once this file, its manifest, is there: written last, as object stores
# have no directory rename. Name -> [size, sha256] of every other file.
COMPLETE = "_COMPLETE.json"


def is_remote(path: str) -> bool:
    """Object storage (an fsspec URL other than ``file://``): what workers put there every node can read."""
    return local_path(str(path)) is None


def upload_files(local: str | Path, url: str, names: list[str] | None = None) -> dict:
    """Copy the files under ``local`` (or just ``names``, relative to it) to ``url``; their manifest entries."""
    root = Path(local)
    files = [root / n for n in names] if names is not None else _files_under(root)
    fs, p = filesystem(url)
    manifest = {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        fs.put_file(str(f), f"{p}/{rel}")
        manifest[rel] = _entry(f)
    return manifest


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _entry(f: Path) -> list:
    """A file's manifest entry: [size, sha256]."""
    from tokenclean.tasks.keys import file_sha256

    return [f.stat().st_size, file_sha256(f, cache=False)]


def local_manifest(root: Path) -> dict:
    """The manifest ``publish_dir`` would commit for the local directory ``root``, without uploading it."""
    return {f.relative_to(root).as_posix(): _entry(f) for f in _files_under(root)}


def commit_dir(url: str, manifest: dict) -> None:
    """Mark ``url`` whole: its manifest, written after every file it lists."""
    fs, p = filesystem(url)
    with fs.open(f"{p}/{COMPLETE}", "w") as f:
        json.dump(manifest, f, sort_keys=True)


def publish_dir(local: str | Path, url: str) -> dict:
    """Upload a finished local directory to ``url`` so that readers see all of it or none (``open_dir``)."""
    fs, p = filesystem(url)
    if fs.exists(f"{p}/{COMPLETE}"):  # a retried writer: its old manifest first, so no reader takes a mix as whole
        fs.rm(f"{p}/{COMPLETE}")
    remove_tree(url)
    manifest = upload_files(local, url)
    commit_dir(url, manifest)
    return manifest


def read_manifest(url: str) -> dict | None:
    """The manifest of a published directory; None while it is not whole (or not there)."""
    fs, p = filesystem(url)
    try:
        with fs.open(f"{p}/{COMPLETE}", "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _whole(url: str) -> dict:
    """The manifest of a directory in object storage, which must be whole."""
    manifest = read_manifest(url)
    if manifest is None:
        raise FileNotFoundError(f"{shown(url)}: not in storage, or not whole (no {COMPLETE}): its writer has not "
                                "finished")
    return manifest


def node_cache() -> Path:
    """This node's copies of directories in object storage, and its training ranks' working checkpoints.
    ``TOKENCLEAN_NODE_CACHE`` names a node's local disk where the default (under ``TOKENCLEAN_CACHE``) is on a
    filesystem shared between nodes: copies are by content and renamed into place, working checkpoints by rank."""
    root = os.environ.get("TOKENCLEAN_NODE_CACHE") or os.path.join(
        os.environ.get("TOKENCLEAN_CACHE") or os.path.expanduser("~/.cache/tokenclean"), "node-cache")
    return Path(root)


def shown(url: str) -> str:
    """``url`` as logs and errors may show it: without a password or query (a signed URL's signature)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(url))
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def open_dir(path: str) -> str:
    """A local directory holding ``path``'s files: ``path`` itself when local. Else this node's copy, fetched once
    and kept by its manifest's digest (a directory published again with other bytes is another copy, never a
    stale one), each file checked against its size and SHA-256 and the whole renamed into place."""
    if not is_remote(path):
        return local_path(str(path))
    return _copy(path, _whole(path))


def _copy(url: str, manifest: dict) -> str:
    """This node's copy of ``url``'s ``manifest`` files: made once, by whichever worker asks first (the others wait
    on a file lock rather than fetching a model each)."""
    from filelock import FileLock

    from tokenclean.tasks.keys import digest

    dest = node_cache() / "dirs" / digest("manifest", manifest)
    if not dest.is_dir():
        locks = node_cache() / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / f"{dest.name}.lock"):
            if not dest.is_dir():
                _download(url, manifest, dest)
    return str(dest)


def open_model(path: str, weights: str | None = None) -> str:
    """What ``from_pretrained`` loads a model from: a local directory or hub id as given (its node has it), or
    this node's copy of a model in object storage, once its manifest is checked to hash to ``weights``, the key
    the run recorded for it: a model published again under the same URL is refused, never loaded as the old."""
    if not is_remote(path):
        return path
    if weights is None:
        raise ValueError(f"{shown(path)}: a model in object storage is loaded only against the weights hash its run "
                         "recorded, and none was given")
    return _checked_copy(path, lambda now: now == weights, "publish changed weights under a new URL")


def open_adapter(path: str, model_key: str | None = None, base_key: str | None = None) -> str:
    """``open_dir`` for an adapter, whose copy from object storage is also checked to be the model ``model_key``
    the run recorded (its weights hash keyed with ``base_key``): an adapter directory published again since, by
    a writer the run no longer waits for, is refused rather than scored or trained on under the old key."""
    if not is_remote(path):
        return local_path(str(path))
    from tokenclean.tasks.keys import adapter_model_key

    if model_key is None or base_key is None:
        raise ValueError(f"{shown(path)}: an adapter in object storage is loaded only against the model key its run "
                         "recorded, and none was given")
    return _checked_copy(path, lambda now: adapter_model_key(base_key, now) == model_key,
                         "re-run the pipeline to record it again")


def _manifest_weights(url: str, manifest: dict) -> str:
    """``keys.weights_hash`` of the published directory ``url``, from its manifest."""
    from tokenclean.tasks.keys import weights_hash_of

    return weights_hash_of(manifest, lambda entry: entry[1], shown(url))


def _checked_copy(url: str, check, advice: str) -> str:
    """This node's copy of ``url`` once ``check`` passes on the weights hash of its manifest."""
    manifest = _whole(url)
    now = _manifest_weights(url, manifest)
    if not check(now):
        raise ValueError(f"{shown(url)} is not the model this run recorded (its weights hash is now {now[:12]}); "
                         f"{advice}")
    return _copy(url, manifest)


OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".onnx", ".ot", ".tflite")  # other frameworks' weights: never read here


def open_tokenizer(path: str) -> str:
    """What ``AutoTokenizer``/``AutoConfig`` load from: a local directory or hub id as given, or this node's copy
    of a model directory in object storage without its weight files (the driver never downloads the weights)."""
    if not is_remote(path):
        return path
    from tokenclean.tasks.keys import WEIGHT_SUFFIXES

    heavy = (*WEIGHT_SUFFIXES, *OTHER_WEIGHT_SUFFIXES)
    meta = {rel: entry for rel, entry in _whole(path).items() if Path(rel).suffix not in heavy}
    return _copy(path, meta)


def publish_model(local: str | Path, url: str) -> str:
    """Upload a model directory to ``url`` in object storage, for ``model.base``/``model.reference``; its weights
    hash. Models are immutable by URL: one already published there with the same files is kept, anything else
    (other weights, or files tokenclean did not publish) is refused, never replaced."""
    from tokenclean.tasks import keys

    if not is_remote(url):
        raise ValueError(f"{url}: not an object-storage URL (s3://, gs://, ...); a local model is used in place")
    local = Path(local)
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local}: not a model directory (no config.json)")
    weights = keys.weights_hash(local)
    fs, p = filesystem(url)
    there = read_manifest(url)
    if there is not None:
        if there == local_manifest(local):
            return weights
        raise FileExistsError(f"{shown(url)} holds another model (other files); publish this one under a new URL")
    if fs.exists(p) and fs.ls(p):
        raise FileExistsError(f"{shown(url)} already holds files tokenclean did not publish (or a publish that was "
                              "interrupted: remove them yourself); choose an empty URL")
    commit_dir(url, upload_files(local, url))
    return weights


def _download(url: str, manifest: dict, dest: Path) -> None:
    fs, p = filesystem(url)
    bad = [rel for rel in manifest if rel.startswith("/") or ".." in rel.split("/")]
    if bad:
        raise OSError(f"{shown(url)}: its manifest names files outside the directory: {bad[:3]}")
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    try:
        for rel, (size, sha) in manifest.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{p}/{rel}", str(tmp / rel))
            if _entry(tmp / rel) != [size, sha]:
                raise OSError(f"{shown(url)}/{rel}: the copy does not match its manifest (size {size}, sha256 "
                              f"{sha[:12]}…)")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process on this node finished the same copy first: keep that one
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    with open(node_cache() / "downloads.jsonl", "a") as log:  # what this node fetched, for the operator
        log.write(json.dumps({"url": shown(url), "dir": dest.name, "bytes": sum(s for s, _ in manifest.values()),
                              "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid()}) + "\n")


def read_json(path: str):
    fs, p = filesystem(path)
    with fs.open(p, "r") as f:
        return json.load(f)


def under(run_dir, path: str) -> str:
    """A path the store records relative to the run directory (a moved run keeps finding it), or a URL as is."""
    return path if is_remote(path) else str(Path(run_dir) / path)


def weights_hash(path: str) -> str:
    """``keys.weights_hash`` of a model directory or cached hub id; in object storage from its manifest, so nothing
    is downloaded."""
    from tokenclean.tasks import keys

    if not is_remote(path):  # a directory, or a hub id (never made absolute: "org/name" is not a path here)
        return keys.weights_hash(keys.resolve_model_dir(str(path).removeprefix("file://")))
    return _manifest_weights(path, _whole(path))
