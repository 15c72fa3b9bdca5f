"""Where an export may write: a new path, or an earlier tokenclean export of the same kind that the user asked to
replace. Never a path tokenclean did not write, and never a run directory's own files.

An export is recognised by its manifest (``tokenclean.json`` inside a directory export,
``NAME.tokenclean.json`` beside a file export), which names its kind and lists the files it
wrote. Everything is written into a staging directory that this module creates beside the
target and renamed into place, so a failed export leaves the target as it was and nothing
behind; replacing an earlier export deletes exactly the files its manifest lists.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenclean.tasks.store.db import DB_FILE

MANIFEST = "tokenclean.json"  # inside a directory export
SIDECAR = ".tokenclean.json"  # appended to a file export's name
MARK = "tokenclean_export"  # the manifest's field naming the export's kind
DIR_KINDS = ("dataset-hf", "model", "adapter")
FILE_KINDS = ("dataset-parquet", "dataset-jsonl")
KINDS = DIR_KINDS + FILE_KINDS


class ExportRefused(ValueError):
    """The target is not one this export may write; the message says why and what to do."""


def manifest_path(out: Path, kind: str) -> Path:
    return out / MANIFEST if kind in DIR_KINDS else out.with_name(out.name + SIDECAR)


def run_dir_of(path: Path) -> Path | None:
    """The run directory ``path`` lies in (itself or the nearest ancestor holding a run database), if any."""
    for p in [path, *path.parents]:
        if (p / DB_FILE).is_file():
            return p
    return None


def _relative_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _earlier_kind(out: Path, kind: str) -> tuple[str | None, list[str] | None]:
    """(kind, files) an earlier export at ``out`` declares; (None, None) where there is no manifest of ours.

    Exports written before manifests named their kind are recognised by their fields (a dataset manifest
    names its ``selection`` and ``format``; a model's provenance its ``adapter`` and ``base_model``); they
    list no files."""
    if kind in DIR_KINDS and not out.is_dir() or kind in FILE_KINDS and not out.is_file():
        return None, None
    try:
        m = json.loads(manifest_path(out, kind).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(m, dict):
        return None, None
    if m.get(MARK) in KINDS:
        files = m.get("files")
        return m[MARK], files if isinstance(files, list) else None
    if {"selection", "format", "path"} <= m.keys() and f"dataset-{m['format']}" in KINDS:
        return f"dataset-{m['format']}", None
    if {"variant", "adapter", "base_model"} <= m.keys():
        return ("adapter" if (out / "adapter_config.json").exists() and not (out / "config.json").exists()
                else "model"), None
    return None, None


def check_target(out: Path, kind: str, *, overwrite: bool) -> None:
    """Raise ``ExportRefused`` unless an export of ``kind`` may be written at ``out``.

    Allowed: a path that does not exist (outside any run directory, or under a run's ``export/``), or, with
    ``overwrite``, an earlier tokenclean export of the same kind holding no file it did not write."""
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}")
    out = Path(out)
    real = Path(os.path.realpath(out))
    run = run_dir_of(real)
    if run is not None and (real == run / "export" or not real.is_relative_to(run / "export")):
        raise ExportRefused(f"{out} is inside the run directory {run}: an export goes under {run / 'export'}/ "
                            "or outside the run")
    side = manifest_path(out, kind)
    if kind in FILE_KINDS and os.path.lexists(side) and not os.path.lexists(out):
        raise ExportRefused(f"{side} exists (a manifest without its export); remove it or choose another --out")
    if not os.path.lexists(out):
        return
    if out.is_symlink():
        raise ExportRefused(f"{out} is a symbolic link; refusing to write through it (choose another --out)")
    earlier, files = _earlier_kind(out, kind)
    if earlier is None:
        raise ExportRefused(f"{out} exists and is not a tokenclean export; refusing to overwrite it "
                            "(choose another --out)")
    if earlier != kind:
        raise ExportRefused(f"{out} holds a tokenclean {earlier} export, not a {kind} one; refusing to replace it "
                            "(choose another --out)")
    if kind in DIR_KINDS and files is None:
        raise ExportRefused(f"{out} holds an export written by an older tokenclean, which did not list its files; "
                            "delete it yourself or choose another --out")
    if kind in DIR_KINDS:
        foreign = sorted(set(_relative_files(out)) - set(files))
        if foreign:
            raise ExportRefused(f"{out} holds files the earlier export did not write ({', '.join(foreign[:5])}"
                                f"{', …' if len(foreign) > 5 else ''}); refusing to replace it")
    if not overwrite:
        raise ExportRefused(f"{out} holds an earlier tokenclean export; pass --overwrite to replace it")


@contextlib.contextmanager
def staging(out: Path):
    """A directory of our own beside ``out`` to write the export into; removed afterwards, whatever happens.

    On the same filesystem as ``out``, so ``commit`` renames rather than copies."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tokenclean-staging", dir=out.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit(staged: Path, out: Path, kind: str, manifest: dict) -> Path:
    """Write ``manifest`` (with the kind and, for a directory, its files), then move ``staged`` (a file or a
    directory inside a ``staging`` directory) to ``out``, replacing the earlier export there, which
    ``check_target`` has approved. Returns the manifest's path."""
    out = Path(out)
    manifest = {MARK: kind, **manifest}
    side = manifest_path(out, kind)
    if kind in DIR_KINDS:
        manifest["files"] = sorted({*_relative_files(staged), MANIFEST})
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        earlier_files = _earlier_kind(out, kind)[1] if out.is_dir() else None
        old = None
        if os.path.lexists(out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tokenclean-old", dir=out.parent))
            os.replace(out, old / "export")
        os.replace(staged, out)
        if old is not None:  # a file that appeared in it since check_target stays, in the -old directory
            _remove_listed(old / "export", earlier_files or [])
            with contextlib.suppress(OSError):
                old.rmdir()
        return side
    side_tmp = staged.with_name(staged.name + SIDECAR)
    side_tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(staged, out)
    os.replace(side_tmp, side)
    return side


def _remove_listed(root: Path, files: list[str]) -> None:
    """Delete an earlier export: the files its manifest lists, then the directories left empty."""
    for rel in files:
        p = root / rel
        if p.is_relative_to(root) and (p.is_file() or p.is_symlink()):
            p.unlink()
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
