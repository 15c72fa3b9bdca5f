"""Input rows, read by splits: byte ranges of JSONL files, whole compressed or JSON-array files, runs of Parquet
row groups, row ranges of datasets.

A split is self-contained: any worker reads exactly its rows, each with its row number in its file and its
input-wide ``ordinal``, so what is made of them does not depend on how the input was split. A file that cannot be
read is skipped with its reason. Hand-written because no reader in the stack keeps line numbers across byte
ranges; the accepted entries and the rules: docs/design.md ("Inputs and splits").
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAW_CHARS = 2000  # how much of a row the quarantine keeps
FORMATS = (".jsonl", ".json", ".parquet")
JSON_FORMATS = (".jsonl", ".json")
# Compressed JSON Lines / JSON arrays: the compressions fsspec opens with the standard library alone.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
# Rows nested deeper than this are quarantined: SFT rows nest a few levels, and below this depth json.loads
# never meets Python's recursion limit, whatever the caller's stack, so a row is refused (or not) alike on
# every worker.
MAX_DEPTH = 100
TOO_DEEP = f"nested too deeply (more than {MAX_DEPTH} levels of arrays/objects)"
_BLOCK = 1 << 24  # bytes read at a time while planning


class RowError(ValueError):
    """A row that cannot be used; the message is the quarantine reason."""


@dataclass
class RawRow:
    source: str
    index: int  # line number (JSONL, blank lines counted) or row number in the file
    value: Any  # the parsed object (Parquet / datasets rows); None for a JSON line not parsed yet
    raw: str
    error: str | None = None
    json_line: bool = False  # ``raw`` is a JSON line, parsed where the chunk is processed
    ordinal: int = 0  # place in the whole input: increasing in input order (not contiguous)

    def parsed(self) -> Any:
        if self.error:
            raise RowError(self.error)
        if self.json_line:
            try:
                if too_deep(self.raw):
                    raise RecursionError
                return json.loads(self.raw)
            except json.JSONDecodeError as e:
                self.raw = self.raw[:RAW_CHARS]
                raise RowError(f"not JSON: {e.msg} at column {e.colno}") from e
            except RecursionError:
                self.raw = self.raw[:RAW_CHARS]
                raise RowError(TOO_DEEP) from None
        return self.value


# JSON strings (whose brackets do not nest) and brackets: what nesting depth is counted over
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def too_deep(text: str, start: int = 0, end: int | None = None) -> bool:
    """Whether JSON text nests arrays/objects more than ``MAX_DEPTH`` deep (counted without recursion)."""
    end = len(text) if end is None else end
    if text.count("[", start, end) + text.count("{", start, end) <= MAX_DEPTH:  # the common case, at C speed
        return False
    depth = 0
    for m in _JSON_TOKENS.finditer(text, start, end):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _value_end(text: str, start: int) -> int | None:
    """Where the array/object opening at ``start`` closes (just after it), without recursion; None if never."""
    depth = 0
    for m in _JSON_TOKENS.finditer(text, start):
        c = m.group()
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


@dataclass(frozen=True)
class Split:
    """Rows ``[start, end)`` of one file: bytes of a JSONL file (on line starts; of the decompressed stream for a
    compressed file), elements of a JSON array, row groups of a Parquet file, rows of a dataset. ``first_row``:
    the file's row number of the first of them; ``ordinal``: the input-wide place of row number 0 of this file
    (a row's ordinal is ``ordinal + its row number``)."""

    number: int
    source: str  # the file's path, or the ``hf:`` entry
    kind: str  # jsonl | array | parquet | hf
    start: int
    end: int
    first_row: int
    ordinal: int
    is_eval: bool
    is_warmup: bool = False  # a row of the separate warm-up input (data.warmup_paths): D0

    def describe(self) -> list:
        return [self.source, self.kind, self.start, self.end, self.is_eval] + ([True] if self.is_warmup else [])


def file_format(path: str) -> tuple[str, str | None] | None:
    """(json | parquet, compression or None) of a file by its name, or None for a format ingest does not read."""
    name = Path(path).name.lower()
    suffix = Path(name).suffix
    compression = COMPRESSIONS.get(suffix)
    if compression is not None:
        name, suffix = name[:-len(suffix)], Path(name[:-len(suffix)]).suffix
    if suffix in JSON_FORMATS:
        return "json", compression
    if suffix == ".parquet" and compression is None:
        return "parquet", None
    return None


def _not_read(path: Path) -> str | None:
    """Why a directory's entry is not read (None: it is): not a readable regular file, or another format."""
    try:
        path.stat()
    except OSError as e:  # a dangling symbolic link or a loop of them, a vanished file
        link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
        return f"unreadable: {e.strerror}{link}"
    if path.is_dir():
        return "a directory (sub-directories are not read)"
    if not path.is_file():
        return "not a regular file"
    if file_format(str(path)) is None:
        return "unsupported format"
    return None


_WANT = ".jsonl or .json (optionally .gz, .bz2, .xz), .parquet or hf:NAME"


def list_entry(entry: str) -> list[tuple[str, str | None]]:
    """Every file of an input entry with the reason it is not read (None: it is read), in name order.

    A directory's files of another format, sub-directories and broken links are listed
    with their reason (they are skipped, and part of the inputs' key). A named file that
    does not exist, or of a format ingest does not read, is an error; so is a directory
    holding no file of a format it reads.
    """
    if entry.startswith("hf:"):
        return [(entry, None)]
    path = Path(entry)
    if not path.exists():
        link = f" (a symbolic link to {os.readlink(path)}, which cannot be followed)" if path.is_symlink() else ""
        raise FileNotFoundError(f"input not found: {entry}{link}")
    if path.is_dir():
        listed = [(str(p), _not_read(p)) for p in sorted(path.iterdir(), key=str)]
        if not any(reason is None for _, reason in listed):
            held = "; ".join(f"{Path(p).name}: {reason}" for p, reason in listed[:5]) or "nothing"
            raise ValueError(f"{entry}: directory holds no files ingest reads (want {_WANT}); it holds {held}")
        return listed
    if file_format(entry) is None:
        raise ValueError(f"{entry}: unsupported format (want {_WANT})")
    return [(entry, None if path.is_file() else "not a regular file")]


def entry_files(entry: str) -> list[str]:
    """The files of an input entry that ingest reads (``hf:`` entries are their own unit), with clear errors."""
    return [f for f, reason in list_entry(entry) if reason is None]


def open_file(path: str, compression: str | None = None):
    """A binary file object over a file's (decompressed) bytes."""
    if compression is None:
        return open(path, "rb")
    import fsspec

    return fsspec.open(path, "rb", compression=compression).open()  # closing it closes the file under it


def _jsonl_cuts(path: str, target_bytes: int, compression: str | None = None
                ) -> tuple[list[tuple[int, int]], int, int]:
    """(byte, line number) of each split start of a JSONL file (the first is (0, 0)), its size, and its lines.

    A cut is the first line start at or after each multiple of ``target_bytes`` past the
    previous cut; lines are counted as ``enumerate(file)`` numbers them. A compressed file
    is counted over its decompressed bytes, and has one split.
    """
    if compression is not None:
        target_bytes = 1 << 62
    cuts, pos, lines, want, last = [(0, 0)], 0, 0, target_bytes, b"\n"
    with open_file(path, compression) as f:
        while block := f.read(_BLOCK):
            while want < pos + len(block):
                nl = block.find(b"\n", max(0, want - 1 - pos))
                if nl < 0:
                    break
                cut = pos + nl + 1
                cuts.append((cut, lines + block.count(b"\n", 0, nl + 1)))
                want = cut + target_bytes
            lines += block.count(b"\n")
            pos += len(block)
            last = block[-1:]
    if cuts[-1][0] >= pos and len(cuts) > 1:
        cuts.pop()  # a cut at the very end starts no line
    return cuts, pos, lines + (pos > 0 and last != b"\n")


class _NotAnArray(ValueError):
    pass


_WS = re.compile(r"[ \t\n\r]*")
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


def _array_text(path: str, compression: str | None) -> str:
    with open_file(path, compression) as f:
        data = f.read()
    # surrogateescape: one element's bad byte must not fail the others (the element is quarantined)
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def _array_elements(text: str) -> Iterator[tuple[str, Any, str | None]]:
    """(raw text, value, error) of each element of a text that is one JSON array; ``_NotAnArray`` if it is not.

    Elements are parsed one at a time, so an element nested too deeply (or holding bytes
    that are not UTF-8) is one quarantined row, not the end of the file.
    """
    decoder = json.JSONDecoder()
    i = _WS.match(text).end()
    if not text.startswith("[", i):
        raise _NotAnArray
    i = _WS.match(text, i + 1).end()
    closed = text.startswith("]", i)
    while not closed:
        start, value, error = i, None, None
        try:
            value, end = decoder.raw_decode(text, start)
        except RecursionError:
            end, error = _value_end(text, start), TOO_DEEP
            if end is None:
                raise _NotAnArray from None
        except json.JSONDecodeError:
            raise _NotAnArray from None
        if error is None and too_deep(text, start, end):
            value, error = None, TOO_DEEP
        if error is None and (bad := _ESCAPED.search(text, start, end)):
            value, error = None, f"not valid UTF-8 (at character {bad.start() - start} of the row)"
        yield text[start:end], value, error
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("]", i):
            closed = True
        else:
            raise _NotAnArray
    if _WS.match(text, i + 1).end() != len(text):
        raise _NotAnArray


def _array_length(path: str, compression: str | None) -> int | None:
    """How many rows a JSON file that is one JSON array holds, or None if it is JSON Lines (as ``datasets``
    decides: an array iff the file, after a byte-order mark, opens with ``[``; a file of JSON lines whose
    first line is itself an array is read as lines)."""
    with open_file(path, compression) as f:
        first = f.readline().removeprefix(b"\xef\xbb\xbf")
        if not first.lstrip().startswith(b"["):
            return None
        try:
            if too_deep(first.decode("utf-8", "replace")):
                raise RecursionError
            json.loads(first)
        except (ValueError, RecursionError):
            pass  # an array over many lines, or a bad first line: the whole file decides
        else:  # the first line is a whole value: an array if nothing follows it
            while block := f.read(1 << 16):
                if block.strip():
                    return None
    try:
        return sum(1 for _ in _array_elements(_array_text(path, compression)))
    except _NotAnArray:
        return None


# What a file that cannot be read raises while it is planned or read: I/O, Arrow, decompression errors.
def _read_errors() -> tuple:
    import lzma
    import zlib

    import pyarrow as pa

    return (OSError, EOFError, ValueError, pa.ArrowException, lzma.LZMAError, zlib.error)


def _reason(e: BaseException) -> str:
    """An exception's message in one line (an OSError's without its errno and path)."""
    text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _load_hf(entry: str):
    import datasets

    name, _, split = entry[3:].partition(":")
    if Path(name).is_dir():  # a dataset saved with save_to_disk
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if (split or "train") not in ds:
                raise ValueError(f"{entry}: the saved dataset has splits {list(ds)}, not {split or 'train'!r}")
            ds = ds[split or "train"]
        elif split:
            raise ValueError(f"{entry}: {name} is a single saved Dataset, with no split {split!r}; "
                             f"use hf:{name}")
        return ds
    return datasets.load_dataset(name, split=split or "train")


@dataclass
class Plan:
    splits: list[Split]
    skipped: dict[str, str] = field(default_factory=dict)  # each file not read -> why


def _file_ranges(source: str, target_bytes: int) -> tuple[str, list[tuple[int, int, int]], int]:
    """(kind, [(start, end, first row)], rows or an upper bound of them) of one readable file's splits."""
    if source.startswith("hf:"):
        ds = _load_hf(source)
        n = len(ds)
        per = max(1, int(target_bytes * n / max(1, ds.data.nbytes)))
        return "hf", [(a, min(n, a + per), a) for a in range(0, n, per)], n
    fmt, compression = file_format(source)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(source).metadata
        ranges, first_group, first_row, rows, size = [], 0, 0, 0, 0
        for g in range(meta.num_row_groups):
            rows += meta.row_group(g).num_rows
            size += meta.row_group(g).total_byte_size
            if size >= target_bytes or g == meta.num_row_groups - 1:
                ranges.append((first_group, g + 1, first_row))
                first_group, first_row, size = g + 1, rows, 0
        return "parquet", ranges, rows
    n = _array_length(source, compression)
    if n is not None:
        return "array", [(0, n, 0)] if n else [], n
    cuts, size, n = _jsonl_cuts(source, target_bytes, compression)
    ends = [c for c, _ in cuts[1:]] + [size]
    return "jsonl", [(c, e, line) for (c, line), e in zip(cuts, ends) if e > c], n


def plan_inputs(entries: list[str], eval_entries: list[str], target_bytes: int,
                warmup_entries: list[str] = ()) -> Plan:
    """Splits of about ``target_bytes`` of input each, over every file of ``entries``, ``eval_entries``
    then ``warmup_entries``, and the files skipped; an error if every file of a group is skipped."""
    plan = Plan([])
    errors = _read_errors()
    ordinal = 0
    for group, is_eval, is_warmup in ((entries, False, False), (eval_entries, True, False),
                                      (warmup_entries, False, True)):
        listed = [item for entry in group for item in list_entry(entry)]
        readable = 0
        for source, reason in listed:
            if reason is None:
                try:
                    kind, ranges, n = _file_ranges(source, target_bytes)
                except errors as e:
                    if source.startswith("hf:"):
                        raise
                    reason = f"unreadable: {_reason(e)}"
            if reason is not None:
                plan.skipped[source] = reason
                continue
            readable += 1
            for start, end, first_row in ranges:
                plan.splits.append(Split(len(plan.splits), source, kind, start, end, first_row, ordinal, is_eval,
                                         is_warmup))
            ordinal += n
        if listed and not readable:
            what = "held-out input" if is_eval else "warm-up input" if is_warmup else "input"
            reasons = "; ".join(f"{s}: {plan.skipped[s]}" for s, _ in listed)
            raise ValueError(f"no {what} file could be read: {reasons}")
    return plan


def plan_splits(entries: list[str], eval_entries: list[str], target_bytes: int) -> list[Split]:
    """The splits of ``plan_inputs`` (files that cannot be read are left out)."""
    return plan_inputs(entries, eval_entries, target_bytes).splits


def read_split(split: Split) -> Iterator[RawRow]:
    """The rows of one split, each with its row number in its file and its input-wide ordinal.

    A part of the file that cannot be read (a corrupt row group, an I/O error, a broken
    compressed stream) is one quarantined row naming what was not read, never an error."""
    reader = {"jsonl": _read_jsonl, "array": _read_array, "parquet": _read_parquet, "hf": _read_hf}[split.kind]
    yield from reader(split)


def _unread(split: Split, i: int, what: str, e: BaseException) -> RawRow:
    return RawRow(split.source, i, None, "", f"{what} could not be read: {_reason(e)}", ordinal=split.ordinal + i)


def _read_parquet(split: Split) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    errors = _read_errors()
    try:
        f = pq.ParquetFile(split.source)
    except errors as e:
        yield _unread(split, split.first_row, "the file", e)
        return
    i = split.first_row
    for g in range(split.start, split.end):
        end = i + f.metadata.row_group(g).num_rows
        try:
            for batch in f.iter_batches(row_groups=[g]):
                for row, error in _batch_rows(batch):
                    yield _table_row(split, i, row, error)
                    i += 1
        except errors as e:
            yield _unread(split, i, f"rows {i}..{end - 1} (row group {g})", e)
        i = end


def _read_hf(split: Split) -> Iterator[RawRow]:
    ds = _load_hf(split.source).select(range(split.start, split.end)).with_format("arrow")
    i = split.first_row
    for batch in ds.iter(batch_size=1024):
        for row, error in _batch_rows(batch):
            yield _table_row(split, i, row, error)
            i += 1


def _batch_rows(batch) -> list[tuple[dict | None, str | None]]:
    """The rows of an Arrow batch as Python dicts; where the batch does not convert (a string that is not
    UTF-8), row by row, so only the bad rows are refused, with the columns at fault."""
    try:
        return [(row, None) for row in batch.to_pylist()]
    except UnicodeDecodeError:
        pass
    out = []
    for i in range(batch.num_rows):
        one = batch.slice(i, 1)
        try:
            out.append((one.to_pylist()[0], None))
        except UnicodeDecodeError as e:
            bad = []
            for name, column in zip(one.schema.names, one.columns):
                try:
                    column.to_pylist()
                except UnicodeDecodeError:
                    bad.append(repr(name))
            out.append((None, f"column {', '.join(bad)} is not valid UTF-8 ({e.reason} at byte {e.start})"))
    return out


def _table_row(split: Split, i: int, row: dict | None, error: str | None = None) -> RawRow:
    if row is None:
        return RawRow(split.source, i, None, "", error, ordinal=split.ordinal + i)
    try:
        raw = json.dumps(row, default=str)[:RAW_CHARS]
    except RecursionError:
        raw, error = "", TOO_DEEP
    return RawRow(split.source, i, row, raw, error, ordinal=split.ordinal + i)


def _read_array(split: Split) -> Iterator[RawRow]:
    i = split.first_row
    try:
        for i, (raw, value, error) in enumerate(_array_elements(_array_text(split.source, _compression(split))),
                                                start=split.first_row):
            yield RawRow(split.source, i, value, raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                         [:RAW_CHARS], error, ordinal=split.ordinal + i)
    except (_NotAnArray, *_read_errors()) as e:  # changed or damaged since it was planned
        yield _unread(split, i, f"the JSON array from element {i}", e)


def _compression(split: Split) -> str | None:
    return file_format(split.source)[1]


def _read_jsonl(split: Split) -> Iterator[RawRow]:
    i = split.first_row
    try:
        with open_file(split.source, _compression(split)) as f:
            if split.start:
                f.seek(split.start)
            pos = split.start
            for line in f:
                if pos >= split.end:
                    return
                at_start, pos = pos == 0, pos + len(line)
                if line.strip():
                    try:
                        # a byte-order mark opens some UTF-8 files (Windows tools): it is not part of the first row
                        text = line.decode("utf-8-sig" if at_start else "utf-8")
                    except UnicodeDecodeError as e:
                        yield RawRow(split.source, i, None, line[:RAW_CHARS].decode("utf-8", "replace"),
                                     f"not valid UTF-8 ({e.reason} at byte {e.start})", ordinal=split.ordinal + i)
                    else:
                        yield RawRow(split.source, i, None, text, json_line=True, ordinal=split.ordinal + i)
                i += 1
    except _read_errors() as e:
        yield _unread(split, i, f"the file from line {i}", e)


def read_rows(entry: str) -> Iterator[RawRow]:
    """Every row of one input entry, in order."""
    for split in plan_splits([entry], [], 1 << 62):
        yield from read_split(split)
