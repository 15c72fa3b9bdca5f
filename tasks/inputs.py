"""Input rows, read by splits: byte ranges of JSONL files, runs of Parquet row groups, row ranges of datasets.

A split is a self-contained unit of reading. Whoever can see the file reads exactly the
split's rows and knows each row's line (or row) number in its file and its place in the
whole input (``ordinal``), so splits can be read by any number of workers on any nodes,
in any order, and what is made of them does not depend on how the input was split.

Planning is the only pass over the whole input: it reads each JSONL file once, at
memory speed (``bytes.count`` over large blocks), to put split boundaries on line starts
and number the lines before each; Parquet files and saved datasets split from their
metadata alone. Written by hand because no reader in the stack keeps line numbers
across byte ranges: Ray Data's ``read_text``/``read_json`` split by file, decode a file
as a whole (one bad byte fails it) and number nothing, and a bad row must be
quarantined with its line, never fail the run or lose its place.

Accepted entries: a ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` file, a directory
of those (its files in name order), or ``hf:NAME[:SPLIT]`` (a ``save_to_disk`` folder or
a dataset the machine has cached).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

RAW_CHARS = 2000  # how much of a row the quarantine keeps
FORMATS = (".jsonl", ".json", ".parquet")
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
                return json.loads(self.raw)
            except json.JSONDecodeError as e:
                self.raw = self.raw[:RAW_CHARS]
                raise RowError(f"not JSON: {e.msg} at column {e.colno}") from e
        return self.value


@dataclass(frozen=True)
class Split:
    """Rows ``[start, end)`` of one file: bytes of a JSONL file (on line starts), row groups of a Parquet
    file, rows of a dataset. ``first_row``: the file's row number of the first of them; ``ordinal``: the
    input-wide place of row number 0 of this file (a row's ordinal is ``ordinal + its row number``)."""

    number: int
    source: str  # the file's path, or the ``hf:`` entry
    kind: str  # jsonl | parquet | hf
    start: int
    end: int
    first_row: int
    ordinal: int
    is_eval: bool

    def describe(self) -> list:
        return [self.source, self.kind, self.start, self.end, self.is_eval]


def entry_files(entry: str) -> list[str]:
    """The files of an input entry (``hf:`` entries are their own unit), with clear errors."""
    if entry.startswith("hf:"):
        return [entry]
    path = Path(entry)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {entry}")
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise ValueError(f"{entry}: directory holds no .jsonl/.json/.parquet files (sub-directories are "
                             "not read)")
        return files
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{entry}: unsupported format (want .jsonl, .json, .parquet or hf:NAME)")
    return [entry]


def _jsonl_cuts(path: str, target_bytes: int) -> tuple[list[tuple[int, int]], int, int]:
    """(byte, line number) of each split start of a JSONL file (the first is (0, 0)), its size, and its lines.

    A cut is the first line start at or after each multiple of ``target_bytes`` past the
    previous cut; lines are counted as ``enumerate(file)`` numbers them.
    """
    cuts, pos, lines, want, last = [(0, 0)], 0, 0, target_bytes, b"\n"
    with open(path, "rb") as f:
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


def plan_splits(entries: list[str], eval_entries: list[str], target_bytes: int) -> list[Split]:
    """Splits of about ``target_bytes`` of input each, over every file of ``entries`` then ``eval_entries``."""
    out: list[Split] = []
    ordinal = 0
    for entry, is_eval in [(e, False) for e in entries] + [(e, True) for e in eval_entries]:
        for source in entry_files(entry):
            if source.startswith("hf:"):
                ds = _load_hf(source)
                n = len(ds)
                per = max(1, int(target_bytes * n / max(1, ds.data.nbytes)))
                ranges = [(a, min(n, a + per), a) for a in range(0, n, per)]
                kind = "hf"
            elif source.lower().endswith(".parquet"):
                import pyarrow.parquet as pq

                meta = pq.ParquetFile(source).metadata
                ranges, first_group, first_row, rows, size = [], 0, 0, 0, 0
                for g in range(meta.num_row_groups):
                    rows += meta.row_group(g).num_rows
                    size += meta.row_group(g).total_byte_size
                    if size >= target_bytes or g == meta.num_row_groups - 1:
                        ranges.append((first_group, g + 1, first_row))
                        first_group, first_row, size = g + 1, rows, 0
                n, kind = rows, "parquet"
            else:
                cuts, size, n = _jsonl_cuts(source, target_bytes)
                ends = [c for c, _ in cuts[1:]] + [size]
                ranges = [(c, e, line) for (c, line), e in zip(cuts, ends) if e > c]
                kind = "jsonl"
            for start, end, first_row in ranges:
                out.append(Split(len(out), source, kind, start, end, first_row, ordinal, is_eval))
            ordinal += n
    return out


def read_split(split: Split) -> Iterator[RawRow]:
    """The rows of one split, each with its row number in its file and its input-wide ordinal."""
    if split.kind == "jsonl":
        yield from _read_jsonl(split)
    elif split.kind == "parquet":
        import pyarrow.parquet as pq

        i = split.first_row
        for batch in pq.ParquetFile(split.source).iter_batches(row_groups=range(split.start, split.end)):
            for row in batch.to_pylist():
                yield _table_row(split, i, row)
                i += 1
    else:
        ds = _load_hf(split.source).select(range(split.start, split.end))
        for i, row in enumerate(ds, start=split.first_row):
            yield _table_row(split, i, row)


def _table_row(split: Split, i: int, row: dict) -> RawRow:
    return RawRow(split.source, i, row, json.dumps(row, default=str)[:RAW_CHARS], ordinal=split.ordinal + i)


def _read_jsonl(split: Split) -> Iterator[RawRow]:
    with open(split.source, "rb") as f:
        f.seek(split.start)
        pos, i = split.start, split.first_row
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


def read_rows(entry: str) -> Iterator[RawRow]:
    """Every row of one input entry, in order."""
    for split in plan_splits([entry], [], 1 << 62):
        yield from read_split(split)
