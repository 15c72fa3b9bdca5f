"""Quarantined rows can be found: ``tokenclean inspect RUN --quarantine`` lists each with its source, line, input id
and reason, and ``inspect --sample ID`` of a refused row says so and why. A real ``prepare`` of a JSONL file holding
bad rows into the run's DuckDB file, read by the real CLI."""
import json

from typer.testing import CliRunner

from tokenclean.cli import app

GOOD = [{"id": f"g{i}", "prompt": f"Question number {i}?", "response": f"Answer number {i}."} for i in range(6)]
BAD = [  # (line as written, its input id or None, a fragment of its reason)
    ({"id": "bad-role", "messages": [{"role": "bot", "content": "hi"}]}, "bad-role", "role must be one of"),
    ({"id": 17, "prompt": "q"}, "17", "missing field 'response'"),
    ('{"id": "torn", "prompt": "x", "response": ', "torn", "not JSON"),  # its id from the leading key
    ({"prompt": "no id here", "response": ""}, None, "empty or whitespace-only response"),
    ({"id": "g1", "prompt": "again", "response": "dup"}, "g1", "duplicate id 'g1'"),
    ({"id": "long-prompt", "prompt": "long " * 600, "response": "r"}, "long-prompt", "no response token"),
]


def _line(row) -> str:
    return (row if isinstance(row, str) else json.dumps(row)) + "\n"


def test_inspect_lists_quarantined_rows_and_explains_a_refused_sample(tmp_path, tiny):
    from tests.conftest import tiny_config
    from tokenclean.config import RunConfig
    from tokenclean.flows.prepare import prepare

    data = tmp_path / "in.jsonl"
    lines = [_line(r) for r in GOOD[:3]] + [_line(r) for r, _, _ in BAD] + [_line(r) for r in GOOD[3:]]
    data.write_text("".join(lines))
    cfg = tiny_config(tmp_path, name="q", mode="fixed")
    cfg["data"] = {"paths": [str(data)], "eval_paths": [str(tiny.eval)], "max_length": 128}
    ctx = prepare(RunConfig.model_validate(cfg), progress=False)
    ctx.con.close()
    run = str(ctx.run_dir)

    res = CliRunner().invoke(app, ["inspect", run, "--quarantine"])
    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    assert out[0].startswith(f"{len(BAD)} quarantined rows in dataset ") and "first" not in out[0]
    listed = [line.split("\t") for line in out[2:]]
    # every bad row, in file order, at its line (0-based, as every quarantine reason counts), with its id and reason
    assert [int(where.rsplit(":", 1)[1]) for where, _, _ in listed] == list(range(3, 3 + len(BAD)))
    assert all(where.rsplit(":", 1)[0] == str(data) for where, _, _ in listed)
    for (where, uid, reason), (_, want_id, says) in zip(listed, BAD):
        assert uid == (want_id or "-") and says in reason, (where, uid, reason)

    res = CliRunner().invoke(app, ["inspect", run, "--quarantine", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert "(the first 2)" in res.output.splitlines()[0]
    assert [line.split("\t") for line in res.output.splitlines()[2:]] == listed[:2]

    for (_, want_id, says), row in zip(BAD, listed):
        if want_id is None or want_id == "g1":  # g1 is a kept sample too (its first row)
            continue
        res = CliRunner().invoke(app, ["inspect", run, "--sample", want_id])
        assert res.exit_code == 0, res.output
        assert "was quarantined" in res.output and says in res.output and row[0] in res.output, res.output
    res = CliRunner().invoke(app, ["inspect", run, "--sample", "never-seen"])
    assert res.exit_code == 2 and "no sample 'never-seen'" in res.output, res.output
