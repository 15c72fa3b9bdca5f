import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.ingest_helpers import ingest
from tokenclean.tasks.ingest import EVAL_PART, assign_part


def _write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return str(path)


GOOD = [
    {"id": "a", "prompt": "What is 2+2?", "response": "4."},
    {"id": "b", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello there."}]},
    {"prompt": "Name a colour.", "response": "Blue.", "task": "colour", "answer": "Blue"},
]
BAD = [  # (row, expected reason fragment)
    (b'{"prompt": "x", "response": \n', "not JSON"),
    (b'{"prompt": "caf\xe9", "response": "ok"}\n', "not valid UTF-8"),
    ({"prompt": "q", "response": ""}, "empty or whitespace-only response"),
    ({"prompt": "q", "response": "   \n "}, "empty or whitespace-only response"),
    ({"prompt": "q"}, "missing field 'response'"),
    ({"prompt": 3, "response": "r"}, "field 'prompt' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "role must be one of"),
    ({"messages": "hello"}, "non-empty list"),
    ([1, 2, 3], "must be a JSON object"),
    ({"id": "a", "prompt": "dup", "response": "dup"}, "duplicate id 'a'"),
    ({"prompt": "q", "response": "r", "answer": "zzz"}, "does not occur in the response"),
    ({"prompt": "q", "response": "abc", "informative_spans": [[0, 9]]}, "outside the response"),
    ({"prompt": "long " * 400, "response": "r"}, "no response token within max_length"),
    ({"text": "only text"}, "neither 'messages' nor 'prompt'"),
    # one bad row must never fail the chunk (or the run): each of these once did
    (b'{"prompt": "P", "response": "abcdef", "informative_spans": [[0, Infinity]]}\n', "integer pairs"),
    (b'{"prompt": "P \\ud800", "response": "abc"}\n', "not valid Unicode"),
    ({"prompt": "q", "response": "abcdef", "informative_spans": [[0.9, 3.9]]}, "integer pairs"),
    ({"prompt": "q", "response": "abcdef", "informative_spans": ["05"]}, "integer pairs"),
    ({"prompt": "q", "response": "abcdef", "informative_spans": [[False, True]]}, "integer pairs"),
    ({"prompt": "q", "response": "abcdef", "informative_spans": [[0, 4]], "corrupted_spans": [[3, 6]]}, "overlaps"),
    ({"prompt": "q", "response": "The answer is 42 ", "answer": "42 "}, "as the template renders it"),
]


def test_bad_rows_are_quarantined_with_reasons_and_good_rows_kept(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "in.jsonl", GOOD + [row for row, _ in BAD])
    res = ingest([path], [], tokenizer, max_length=128, eval_fraction=0.0, n_parts=2, seed=0)
    assert res.n_read == len(GOOD) + len(BAD)
    assert res.samples.num_rows == len(GOOD)
    assert res.samples.column("uid").to_pylist()[:2] == ["a", "b"]
    reasons = [q["reason"] for q in res.quarantine]
    assert len(reasons) == len(BAD)
    for (_, expected), got in zip(BAD, reasons):
        assert expected in got, (expected, got)
    assert all(q["source"].endswith("in.jsonl") and q["row_index"] >= 3 for q in res.quarantine)


def test_answer_span_and_truth_are_token_aligned(tmp_path, tokenizer):
    resp = "Sure! The colour is deep blue. Bye."
    row = {"prompt": "Colour?", "response": resp, "answer": "deep blue",
           "informative_spans": [[resp.index("deep"), resp.index("deep") + 9]]}
    res = ingest([_write_jsonl(tmp_path / "a.jsonl", [row])], [], tokenizer, max_length=128, eval_fraction=0.0,
                 n_parts=1, seed=0)
    r = res.samples.to_pylist()[0]
    ans = r["input_ids"][r["answer_start"]:r["answer_end"]]
    assert tokenizer.decode(ans).strip() == "deep blue"
    labelled = [t for t, lab in zip(r["input_ids"], r["truth"]) if lab == 1]
    assert tokenizer.decode(labelled).strip() == "deep blue"


def test_an_answer_cut_by_truncation_has_no_span(tmp_path, tokenizer):
    """The tokens truncation leaves of an answer are not the answer: no span, so no metric reads a part of it."""
    row = {"prompt": "Colour?", "response": "It is deep blue sea green, I think.", "answer": "deep blue sea green"}
    path = _write_jsonl(tmp_path / "a.jsonl", [row])
    full = ingest([path], [], tokenizer, max_length=128, eval_fraction=0.0, n_parts=1, seed=0).samples.to_pylist()[0]
    assert not full["truncated"] and full["answer_start"] >= 0
    for cut in range(full["answer_start"] + 1, full["answer_end"]):  # every cut inside the answer
        r = ingest([path], [], tokenizer, max_length=cut, eval_fraction=0.0, n_parts=1,
                   seed=0).samples.to_pylist()[0]
        assert r["truncated"] and (r["answer_start"], r["answer_end"]) == (-1, -1), cut
    r = ingest([path], [], tokenizer, max_length=full["answer_end"], eval_fraction=0.0, n_parts=1,
               seed=0).samples.to_pylist()[0]
    assert (r["answer_start"], r["answer_end"]) == (full["answer_start"], full["answer_end"])  # cut just after it


def test_a_byte_order_mark_and_null_columns_are_not_rows_content(tmp_path, tokenizer):
    """A UTF-8 BOM before the first JSON line, and a null ``messages`` column beside prompt/response
    (what Parquet and datasets give rows of a mixed file), are read as absent."""
    j = tmp_path / "bom.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD[0]) + "\n").encode())
    p = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": GOOD[1]["messages"], "prompt": None, "response": None},
                                         {"messages": None, "prompt": "What is 2+2?", "response": "4."}]), p)
    res = ingest([str(j), str(p)], [], tokenizer, max_length=128, eval_fraction=0.0, n_parts=1, seed=0)
    assert res.quarantine == [] and res.samples.num_rows == 3


def test_a_chat_template_that_refuses_a_conversation_quarantines_the_row(tmp_path, tokenizer):
    """A model template's own raise_exception (Mistral-v0.1, Llama-2: roles must alternate) refuses one row."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}")
    path = _write_jsonl(tmp_path / "a.jsonl", GOOD[:2])  # GOOD[1] opens with a system turn
    res = ingest([path], [], tok, max_length=128, eval_fraction=0.0, n_parts=1, seed=0, template="model")
    assert res.samples.num_rows == 1
    assert [q["reason"] for q in res.quarantine] == [
        "the chat template refuses the conversation: Conversation roles must alternate user/assistant"]


def test_parquet_and_hf_dataset_inputs_match_jsonl(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(20)]
    j = _write_jsonl(tmp_path / "d.jsonl", rows)
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(hf_dir))
    kw = dict(max_length=128, eval_fraction=0.2, n_parts=3, seed=1)
    out = [ingest([e], [], tokenizer, **kw).samples for e in (j, str(p), f"hf:{hf_dir}")]
    for o in out[1:]:
        assert o.column("input_ids").to_pylist() == out[0].column("input_ids").to_pylist()
        assert o.column("part").to_pylist() == out[0].column("part").to_pylist()
    assert out[0].num_rows == 20


def test_unknown_format_and_missing_file_fail_clearly(tmp_path, tokenizer):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported format"):
        ingest([str(tmp_path / "x.csv")], [], tokenizer, max_length=64, eval_fraction=0, n_parts=1, seed=0)
    with pytest.raises(FileNotFoundError, match="input not found"):
        ingest([str(tmp_path / "nope.jsonl")], [], tokenizer, max_length=64, eval_fraction=0, n_parts=1, seed=0)
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "response": "r"}]).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="no split 'test'"):
        ingest([f"hf:{tmp_path / 'hf'}:test"], [], tokenizer, max_length=64, eval_fraction=0, n_parts=1, seed=0)


def test_split_is_deterministic_and_balanced():
    parts = [assign_part(f"id-{i}", 0, 0.1, 3, False) for i in range(6000)]
    assert parts == [assign_part(f"id-{i}", 0, 0.1, 3, False) for i in range(6000)]
    assert abs(parts.count(EVAL_PART) / 6000 - 0.1) < 0.02
    for p in range(3):
        assert abs(parts.count(p) / 6000 - 0.3) < 0.03
    assert assign_part("id-1", 0, 0.1, 3, True) == EVAL_PART
    assert parts != [assign_part(f"id-{i}", 1, 0.1, 3, False) for i in range(6000)]


def test_output_is_the_same_for_any_splitting_chunking_and_number_of_workers(tmp_path, tiny, tokenizer):
    """Sample ids, parts, every column and the quarantine (duplicates across splits included, with their line
    numbers) do not depend on how the input files are split, how rows are chunked, or how many Ray workers
    read and tokenise the splits."""
    import ray

    rows = [json.loads(line) for line in open(tiny.train)][:300]
    mixed = []
    for i, r in enumerate(rows):
        mixed.append(r)
        if i % 37 == 5:
            mixed.append(BAD[i % len(BAD)][0])
    mixed += [rows[3], rows[250]]  # ids seen before, far apart: in other chunks
    mixed.append({"id": "a", "prompt": "dup", "response": "dup"})  # GOOD's "a" (in extra.jsonl) comes after it
    train = _write_jsonl(tmp_path / "train.jsonl", mixed)
    extra = _write_jsonl(tmp_path / "extra.jsonl", GOOD)
    kw = dict(max_length=96, eval_fraction=0.1, n_parts=3, seed=5)
    started = not ray.is_initialized()
    try:
        runs = [ingest([train, extra], [str(tiny.eval)], tokenizer, chunk_rows=c, workers=w, split_bytes=b, **kw)
                for c, w, b in ((100_000, 1, 1 << 30), (7, 1, 1 << 30), (100_000, 1, 1500), (7, 3, 2000),
                                (64, 2, 700))]
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    first = runs[0]
    assert first.samples.num_rows > 300 and any("duplicate id" in q["reason"] for q in first.quarantine)
    assert sum("duplicate id" in q["reason"] for q in first.quarantine) >= 3  # GOOD's "a" again, rows 3 and 250
    for other in runs[1:]:
        assert other.n_read == first.n_read
        assert other.samples.equals(first.samples)
        assert other.quarantine == first.quarantine



def test_ingest_of_a_pool_larger_than_its_memory_budget_completes_within_it(tmp_path, tiny):
    """A subprocess ingests 12,000 rows of 1,024 tokens (12.3 M tokens) under an enforced budget of 400 MB of
    growth. Held the way ingest once held a pool (Python lists, about 52 bytes a token, measured in issue 13),
    those tokens alone would need 640 MB; streamed in chunks, the process stays under the budget."""
    import subprocess
    import sys
    from pathlib import Path

    rows, words, budget_mb = 12_000, 700, 400
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(rows):
            text = " ".join(f"w{(i * 31 + j * 7) % 997}" for j in range(words))
            f.write(json.dumps({"id": f"r{i}", "prompt": f"Say something, {i}.", "response": text}) + "\n")
    child = Path(__file__).with_name("ingest_memory_child.py")
    out = subprocess.run([sys.executable, str(child), str(tiny.model), str(tmp_path / "big.jsonl"),
                          str(tmp_path / "run.duckdb"), str(budget_mb), "16", "128MB"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["samples"] == rows
    assert got["tokens"] * 52 / 2**20 > budget_mb, got  # the pool, held as lists, would not fit the budget
    assert got["growth_mb"] <= budget_mb, got


def test_content_text_is_the_canonical_json_the_sample_ids_were_named_by():
    """``content_text`` writes out ``json.dumps(..., sort_keys=True)``; any difference would rename samples."""
    import random

    from tokenclean.tasks.validate import content_text

    rng = random.Random(0)
    alphabet = ['"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "日本", "🙂", "\u2028", "\ud800", "a", " ", "{"]
    for _ in range(500):
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))}
                    for _ in range(rng.randint(1, 4))]
        task = rng.choice([None, "", "profile", "日本\n"])
        answer = rng.choice([None, "a", '"quoted"'])
        truth = [(rng.randint(0, 50), rng.randint(51, 99), rng.choice([1, 2])) for _ in range(rng.randint(0, 4))]
        expected = json.dumps({"messages": messages, "task": task, "answer": answer, "truth": sorted(truth)},
                              sort_keys=True)
        assert content_text(messages, task, answer, truth) == expected


def test_splits_read_every_row_once_with_its_line_number_and_input_order(tmp_path):
    """Any split size gives back the rows of reading each file whole: JSONL (blank lines, bad UTF-8, a last
    line without a newline), Parquet with several row groups, a saved HF dataset; line numbers as
    ``enumerate(file)`` counts them, ordinals increasing across files in input order."""
    import random

    import datasets

    from tokenclean.tasks.inputs import plan_splits, read_rows, read_split

    rng = random.Random(0)
    lines = []
    for i in range(300):
        c = rng.random()
        lines.append(b"" if c < 0.1 else b"  " if c < 0.15 else b'{"x": "caf\xe9"}' if c < 0.2
                     else json.dumps({"i": i, "pad": "y" * rng.randint(0, 60)}).encode())
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines))  # no newline after the last line
    rows = [{"i": i, "prompt": f"q{i}", "response": "r" * (i % 13)} for i in range(500)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet", row_group_size=37)
    datasets.Dataset.from_list(rows[:90]).save_to_disk(str(tmp_path / "saved"))
    entries = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    evals = [f"hf:{tmp_path / 'saved'}"]

    def key(r):
        return (r.source, r.index, r.raw, r.error)

    whole = [key(r) for e in entries + evals for r in read_rows(e)]
    line_numbers = [i for i, line in enumerate(open(tmp_path / "a.jsonl", "rb")) if line.strip()]
    assert [k[1] for k in whole if k[0].endswith("a.jsonl")] == line_numbers
    for target in (1, 50, 999, 4000, 1 << 40):
        splits = plan_splits(entries, evals, target)
        got = [r for s in splits for r in read_split(s)]
        assert [key(r) for r in got] == whole, target
        ordinals = [r.ordinal for r in got]
        assert ordinals == sorted(ordinals) and len(set(ordinals)) == len(ordinals)
        assert [s.is_eval for s in splits] == sorted(s.is_eval for s in splits)
    assert len(plan_splits(entries, evals, 50)) > 20


def test_an_interrupted_ingest_resumes_from_its_finished_parts(tmp_path, tiny, tokenizer):
    """Re-running an ingest whose parts directory lost one part (the run died before writing it) processes that
    split alone and stages exactly what a fresh ingest stages; a changed spec never reads the old parts."""
    import duckdb

    from tokenclean.flows.ingest import stage_inputs
    from tokenclean.tasks import storage, store
    from tokenclean.tasks.ingest import IngestSpec

    spec = IngestSpec("t", 96, 0.1, 3, 5)
    parts = str(tmp_path / "parts")

    def staged(spec, parts_dir):
        con = duckdb.connect()
        read = stage_inputs(con, [str(tiny.train)], [str(tiny.eval)], tokenizer, spec, parts_dir=parts_dir,
                            split_bytes=4000)
        return read, store.staged_samples(con), store.staged_quarantine(con)

    first, samples, quarantine = staged(spec, parts)
    assert first["splits"] > 3 and first["splits_reused"] == 0
    files = sorted(p for p in (tmp_path / "parts").rglob("part-*.parquet") if "quarantine" not in p.name)
    assert len(files) == first["splits"]
    storage.remove(str(files[2]))
    again, samples2, quarantine2 = staged(spec, parts)
    assert again["splits_reused"] == first["splits"] - 1
    assert samples2.equals(samples) and quarantine2 == quarantine
    fresh = staged(spec, str(tmp_path / "fresh"))
    assert fresh[1].equals(samples) and fresh[2] == quarantine
    other = staged(IngestSpec("t", 24, 0.1, 3, 5), parts)  # another max length (truncating): other parts
    assert other[0]["splits_reused"] == 0 and not other[1].equals(samples)
