"""Every bad input file or row is a quarantine entry, a skipped file with its reason, or a one-line error; every
good row is ingested, and nothing else is lost. Real files (corrupt Parquet, broken links, compressed streams),
read by the real ingest into DuckDB."""
import bz2
import gzip
import json
import lzma
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.ingest_helpers import ingest


def _good(i):
    return {"id": f"g{i}", "prompt": f"Question number {i}?", "response": f"Answer number {i}."}


def _lines(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


DEEP_LINE = "[" * 100_000  # once a RecursionError that stopped the run
DEEP_FIELD = '{"prompt": "q", "response": "r", "extra": ' + "[" * 150 + "]" * 150 + "}"


def _corrupt_row_group(path, group):
    """Overwrite one row group's column chunk (its page header included); the footer stays valid."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(1)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))


def _matrix(d):
    """One file per class of bad input next to good rows. Returns (good ids, expected quarantine as
    (file, row, reason fragment), expected skipped {file: reason fragment})."""
    d.mkdir()
    good, quarantine, skipped = [], [], {}
    g = iter(range(1000))

    def take(n):
        rows = [_good(next(g)) for _ in range(n)]
        good.extend(r["id"] for r in rows)
        return rows

    a, b = take(2), take(1)
    (d / "a.jsonl").write_bytes(_lines([*a, DEEP_LINE, *b, DEEP_FIELD]))
    quarantine += [("a.jsonl", 2, "nested too deeply"), ("a.jsonl", 4, "nested too deeply")]
    (d / "b.jsonl.gz").write_bytes(gzip.compress(_lines(take(2))))
    arr = take(2)
    (d / "c.json").write_text(json.dumps([*arr, json.loads("[" * 150 + "]" * 150), *take(1)], indent=2))
    quarantine.append(("c.json", 2, "nested too deeply"))
    (d / "d.json.bz2").write_bytes(bz2.compress(json.dumps(take(2)).encode()))
    (d / "e.jsonl.xz").write_bytes(lzma.compress(_lines(take(1))))
    first, second = take(1), take(1)
    prompts = pa.array([first[0]["prompt"].encode(), b"caf\xe9", second[0]["prompt"].encode()], pa.binary())
    pq.write_table(pa.table({"id": [first[0]["id"], "bad-utf8", second[0]["id"]], "prompt": prompts.view(pa.string()),
                             "response": [first[0]["response"], "ok", second[0]["response"]]}), d / "f.parquet")
    quarantine.append(("f.parquet", 1, "column 'prompt' is not valid UTF-8"))
    grouped = take(2) + [_good(500), _good(501)] + take(2)  # rows 2..3, row group 1, are lost to corruption
    pq.write_table(pa.Table.from_pylist(grouped), d / "g.parquet", row_group_size=2)
    _corrupt_row_group(d / "g.parquet", 1)
    quarantine.append(("g.parquet", 2, "rows 2..3 (row group 1) could not be read"))
    (d / "empty.parquet").write_bytes(b"")
    skipped["empty.parquet"] = "unreadable: Parquet file size is 0 bytes"
    (d / "garbage.parquet").write_bytes(b"not parquet " * 50)
    skipped["garbage.parquet"] = "magic bytes not found"
    whole = gzip.compress(_lines([_good(600 + i) for i in range(100)]))
    (d / "truncated.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # a partial download
    skipped["truncated.jsonl.gz"] = "unreadable: Compressed file ended"
    explicit = sorted(str(p) for p in d.iterdir())  # every file of a format ingest reads, bad ones included
    (d / "notes.txt").write_text("not data\n")
    (d / "rows.csv").write_text("prompt,response\nq,r\n")
    skipped |= {"notes.txt": "unsupported format", "rows.csv": "unsupported format"}
    (d / "sub.jsonl").mkdir()
    (d / "sub.jsonl" / "x.jsonl").write_bytes(_lines([_good(700)]))
    skipped["sub.jsonl"] = "a directory (sub-directories are not read)"
    os.symlink(d / "gone.jsonl", d / "dangling.jsonl")
    skipped["dangling.jsonl"] = "unreadable: No such file or directory (a symbolic link to"
    os.symlink("loop.jsonl", d / "loop.jsonl")
    skipped["loop.jsonl"] = "unreadable: Too many levels of symbolic links"
    return good, quarantine, skipped, explicit


def _check(res, good, quarantine, skipped):
    assert sorted(res.samples.column("uid").to_pylist()) == sorted(good)
    got = [(os.path.basename(q["source"]), q["row_index"], q["reason"]) for q in res.quarantine]
    assert [(f, i) for f, i, _ in got] == [(f, i) for f, i, _ in quarantine], got
    for (_, _, want), (_, _, reason) in zip(quarantine, got):
        assert want in reason and "\n" not in reason, (want, reason)
    assert res.n_read == len(good) + len(quarantine)
    names = {os.path.basename(f): why for f, why in res.skipped.items()}
    assert sorted(names) == sorted(skipped), names
    for name, want in skipped.items():
        assert want in names[name] and "\n" not in names[name], (name, names[name])


KW = dict(max_length=128, eval_fraction=0.0, n_parts=2, seed=0)


def test_bad_input_matrix_in_a_directory_and_as_named_files(tmp_path, tokenizer):
    """Nothing raises: every good row is a sample, every bad row is quarantined with its file, row and reason,
    every file that cannot be read or is of another format is listed with its reason; the same for any
    splitting and chunking, and for the files named one by one."""
    good, quarantine, skipped, explicit = _matrix(tmp_path / "d")
    runs = [ingest([str(tmp_path / "d")], [], tokenizer, chunk_rows=c, split_bytes=b, **KW)
            for c, b in ((4096, 1 << 30), (2, 40))]
    _check(runs[0], good, quarantine, skipped)
    assert runs[1].samples.equals(runs[0].samples) and runs[1].quarantine == runs[0].quarantine
    named = ingest(explicit, [], tokenizer, **KW)
    _check(named, good, quarantine, {n: w for n, w in skipped.items() if str(tmp_path / "d" / n) in explicit})
    assert named.samples.equals(runs[0].samples)


def test_inputs_that_cannot_be_read_at_all_are_one_line_errors(tmp_path, tokenizer):
    """A named file of another format, a broken link, a directory with nothing to read, and inputs none of whose
    files can be read: one line naming the file(s) and the cause."""
    _matrix(tmp_path / "d")
    d = tmp_path / "d"
    cases = [([d / "notes.txt"], ValueError, "unsupported format"),
             ([d / "dangling.jsonl"], FileNotFoundError, "input not found"),
             ([d / "loop.jsonl"], FileNotFoundError, "input not found"),
             ([d / "sub.jsonl", d / "a.jsonl"], None, None),  # a directory holding a file: read
             ([d / "empty.parquet", d / "garbage.parquet", d / "truncated.jsonl.gz"], ValueError,
              "no input file could be read")]
    (d / "nothing").mkdir()
    (d / "nothing" / "readme.md").write_text("x")
    cases.append(([d / "nothing"], ValueError, "holds no files ingest reads"))
    for paths, error, fragment in cases:
        if error is None:
            assert ingest([str(p) for p in paths], [], tokenizer, **KW).samples.num_rows == 4
            continue
        with pytest.raises(error) as e:
            ingest([str(p) for p in paths], [], tokenizer, **KW)
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
        for p in paths:
            assert str(p) in str(e.value)


def _without_source(table):
    return table.drop_columns(["source"])


def test_compressed_json_lines_and_json_arrays_give_the_rows_of_json_lines(tmp_path, tiny, tokenizer):
    """The same rows as JSON Lines, gzip/bz2/xz JSON Lines, a JSON array (pretty-printed, with a byte-order mark,
    compressed) give the same samples, parts and quarantine, whatever the split size."""
    rows = [json.loads(line) for line in open(tiny.train)][:120]
    rows[7] = {"prompt": "q"}  # quarantined with its row number in each form
    rows[50] = rows[3]  # a duplicate id
    plain = _lines(rows)
    array = json.dumps(rows, indent=1).encode()
    files = {"x.jsonl": plain, "x.jsonl.gz": gzip.compress(plain), "x.json.bz2": bz2.compress(plain),
             "x.jsonl.xz": lzma.compress(plain), "y.json": array, "y-bom.json": b"\xef\xbb\xbf" + array,
             "y.json.gz": gzip.compress(array), "z.json": json.dumps(rows).encode()}
    kw = dict(max_length=96, eval_fraction=0.1, n_parts=3, seed=5)
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = [ingest([str(tmp_path / name)], [], tokenizer, split_bytes=b, **kw) for b in (1 << 30, 2000)]
    first = out["x.jsonl"][0]
    assert first.samples.num_rows == 118 and len(first.quarantine) == 2
    for name, runs in out.items():
        for res in runs:
            assert _without_source(res.samples).equals(_without_source(first.samples)), name
            assert [(q["row_index"], q["reason"].replace(name, "x.jsonl")) for q in res.quarantine] == \
                   [(q["row_index"], q["reason"]) for q in first.quarantine], name
            assert res.skipped == {}


def test_a_file_of_json_lines_whose_first_row_is_an_array_is_still_json_lines(tmp_path, tokenizer):
    """A top-level array is a list of rows only when it is the whole file (as ``datasets`` reads it)."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(_lines([[1, 2], _good(0), DEEP_LINE, _good(1)]))
    res = ingest([str(path)], [], tokenizer, **KW)
    assert res.samples.column("uid").to_pylist() == ["g0", "g1"]
    assert [(q["row_index"], q["reason"].split(" (")[0]) for q in res.quarantine] == [
        (0, "row must be a JSON object, got list"), (2, "nested too deeply")]
    one = tmp_path / "one.jsonl"
    one.write_bytes(_lines([[_good(0), _good(1)]]))  # one line holding the array: the whole file
    assert ingest([str(one)], [], tokenizer, **KW).samples.column("uid").to_pylist() == ["g0", "g1"]


def test_a_directorys_skipped_files_are_part_of_the_inputs_key(tmp_path):
    """Adding or changing a file ingest does not read (another format, a broken link) changes the inputs' key."""
    from tokenclean.tasks.keys import inputs_fingerprint

    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_bytes(_lines([_good(0)]))
    keys = [inputs_fingerprint([str(d)])]
    (d / "more.csv").write_text("prompt,response\nq,r\n")
    keys.append(inputs_fingerprint([str(d)]))
    (d / "more.csv").write_text("prompt,response\nq,s\n")
    keys.append(inputs_fingerprint([str(d)]))
    (d / "more.jsonl.gz").write_bytes(gzip.compress(_lines([_good(1)])))
    keys.append(inputs_fingerprint([str(d)]))
    os.symlink(d / "gone", d / "link.jsonl")
    keys.append(inputs_fingerprint([str(d)]))
    assert len(set(keys)) == len(keys)
    assert inputs_fingerprint([str(d)]) == keys[-1]


def test_skipped_files_are_listed_in_the_run_overview(tmp_path, tiny):
    """Through ``prepare`` into the run database: the skipped files and their reasons are stored with the
    dataset's ingest summary, which ``tokenclean inspect`` shows (``run_overview``); bad rows in the quarantine."""
    from tests.conftest import tiny_config
    from tokenclean.config import RunConfig
    from tokenclean.flows.prepare import prepare
    from tokenclean.summary import run_overview
    from tokenclean.tasks import store

    good, quarantine, skipped, _ = _matrix(tmp_path / "d")
    cfg = tiny_config(tmp_path, name="bad", mode="fixed")
    cfg["data"] = {"paths": [str(tmp_path / "d")], "eval_paths": [str(tiny.eval)], "max_length": 128}
    ctx = prepare(RunConfig.model_validate(cfg), progress=False)
    try:
        run = store.start_flow_run(ctx.con, "fixed_model_cleaning", {}, ctx.dataset)
        store.finish_flow_run(ctx.con, run)
        ov = run_overview(ctx.con)
        listed = {os.path.basename(f): why for f, why in ov["ingest"]["skipped_files"].items()}
        assert sorted(listed) == sorted(skipped)
        assert ov["ingest"]["quarantined"] == len(quarantine)
        stored = ctx.con.execute("SELECT source, row_index, reason FROM quarantine WHERE dataset = ? "
                                 "ORDER BY source, row_index", [ctx.dataset]).fetchall()
        assert sorted((os.path.basename(s), i) for s, i, _ in stored) == sorted((f, i) for f, i, _ in quarantine)
    finally:
        ctx.con.close()
