"""`tokenclean report`: HTML built from a real run database, checked as text and rendered in headless Chromium.

The run database is made with the real ingest, store and selection functions on the tiny
embedded model's tokenizer and data; only the token losses are synthetic (seeded random),
so no scoring or training runs here.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.ingest_helpers import ingest, insert_dataset
from tokenclean.report import build_report, classify_trend, token_pieces
from tokenclean.tasks import storage, store
from tokenclean.tasks.ingest import assign_part

SEED, N_PARTS = 0, 3
INJECTED = "<script>alert('pwn')</script> What is the motto of Q&A <b>club</b>?"
TREND_SERIES = {  # task: reference@0, self-evolving@1..3
    "rising": [0.20, 0.30, 0.30, 0.50],
    "falling": [0.60, 0.50, 0.45, 0.30],
    "unstable": [0.30, 0.50, 0.20, 0.40],
    "flat": [0.40, 0.405, 0.40, 0.40],
}
DATASET, BASE, THETA = "d0", "b0", {1: "c1", 2: "c2"}  # hand-made keys
SCORES = {1: "e1", 2: "e2"}  # base - theta_1, base - theta_2
SELECTIONS = [  # name (variant label), method, parts, scores (by theta), selection key
    ("global", "global", [0, 1, 2], 1, "f1"),
    ("local", "local", [0, 1, 2], 1, "f2"),
    ("random", "random", [0, 1, 2], None, "f3"),
    ("full", "full", [0, 1, 2], None, "f4"),
    ("self-evolving@1", "global", [1], 1, "f5"),
    ("self-evolving@2", "global", [2], 2, "f6"),
]
# seconds each selection's stage log row claims: logged in this order, a long stage started before a short one
# logged ahead of it, so the order by start differs from the order they finished in
STAGE_SECONDS = {"global": 0.5, "local": 30.0, "random": 0.25, "full": 4.0, "self-evolving@1": 0.1,
                 "self-evolving@2": 12.0}


def _uids_in_parts(prefix: str, parts: set[int], n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        uid = f"{prefix}-{i}"
        if assign_part(uid, SEED, 0.0, N_PARTS, False) in parts:
            out.append(uid)
        i += 1
    return out


def _extra_source(path: Path) -> None:
    """A second training source: an HTML/script injection, ordinary rows, and rows that must be quarantined."""
    inj, *rest = _uids_in_parts("extra", {1, 2}, 4)  # 4 rows: all shown (8 samples, round-robin over 2 sources)
    rows = [{"id": inj, "task": "motto", "prompt": INJECTED,
             "response": "Our motto is <i>always</i> \"1 < 2 & 3 > 2\".",
             "answer": "always"}]
    rows += [{"id": u, "task": "motto", "prompt": f"Question {u}?", "response": f"The answer for {u} is yes."}
             for u in rest]
    lines = [json.dumps(r) for r in rows]
    lines += ["{not json", json.dumps({"id": "empty", "prompt": "hi", "response": "   "})]
    path.write_text("\n".join(lines) + "\n")


def _write_losses(con, tmp: Path, model: str, shift: float, rng) -> None:
    rows = con.execute("SELECT sample_id, pos, token_id FROM response_tokens ORDER BY sample_id, pos").fetchnumpy()
    tbl = pa.table({k: rows[k] for k in ("sample_id", "pos", "token_id")})
    loss = rng.gamma(2.0, 1.0, tbl.num_rows).astype(np.float32) + np.float32(shift)
    t = pa.table({"sample_id": tbl["sample_id"].cast(pa.int64()), "pos": tbl["pos"].cast(pa.int32()),
                  "token_id": tbl["token_id"].cast(pa.int32()), "loss": pa.array(loss, pa.float32())})
    path = tmp / "losses" / f"{model}.parquet"
    storage.write_parquet(t, path)
    store.load_loss_shard(con, model, 0, path)


def _eval(con, flow_run, variant, it, key, rows):
    store.record_eval(con, key, "m", {}, rows)
    store.record_output(con, flow_run, variant, it, "eval", key, True)


@pytest.fixture(scope="module")
def run_db(tiny, tmp_path_factory):
    """A run database written through the store's own functions, as the two flows would leave it."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("report-run")
    extra = tmp / "extra.jsonl"
    _extra_source(extra)
    tok = AutoTokenizer.from_pretrained(tiny.model)
    res = ingest([str(tiny.train), str(extra)], [str(tiny.eval)], tok, max_length=256, eval_fraction=0.0,
                 n_parts=N_PARTS, seed=SEED)
    db = tmp / "tokenclean.duckdb"
    con = store.connect(db)
    summary = {"rows_read": res.n_read, "samples": res.samples.num_rows, "quarantined": len(res.quarantine),
               "truncated": 0}
    insert_dataset(con, DATASET, res.samples, res.quarantine, {"tokenizer": str(tiny.model)}, summary)
    store.record_model(con, BASE, "base", {"path": str(tiny.model)})
    rng = np.random.default_rng(1234)
    for model, shift in ((BASE, 0.5), (THETA[1], 0.0), (THETA[2], -0.2)):
        _write_losses(con, tmp, model, shift, rng)
    store.ensure_scores(con, SCORES[1], BASE, THETA[1], DATASET, [0, 1, 2])
    store.ensure_scores(con, SCORES[2], BASE, THETA[2], DATASET, [2])
    fixed = store.start_flow_run(con, "fixed-model-cleaning", {}, DATASET)
    evolving = store.start_flow_run(con, "self-evolving-cleaning", {}, DATASET)
    store.record_output(con, fixed, "base", 0, "model", BASE, False)
    sel_out = {}
    for name, method, parts, theta, key in SELECTIONS:
        # the flows hand every fixed method the pool's scores; only global/local may record them
        sel_out[name] = store.write_selection(con, key, method, 0.6, dataset=DATASET, parts=parts,
                                              pool=store.pool_digest(con, DATASET, parts),
                                              scores=SCORES[theta or 1], seed=0)
        variant, _, it = name.partition("@")
        store.record_output(con, evolving if it else fixed, variant, int(it or 1), "selection", key, True)
        store.log_stage(con, evolving if it else fixed, "select", name, key, STAGE_SECONDS[name], sel_out[name])
    for n, (variant, it, loss, em) in enumerate((("base", 0, 2.0, 0.05), ("reference", 0, 1.5, 0.3),
                                                 ("full", 1, 1.2, 0.4), ("random", 1, 1.3, 0.35),
                                                 ("local", 1, 1.1, 0.45), ("global", 1, 1.0, 0.5))):
        rows = [("response_loss", None, loss), ("answer_match", None, em)]
        if variant == "reference":
            rows += [("answer_match", task, series[0]) for task, series in TREND_SERIES.items()]
        _eval(con, fixed, variant, it, f"a{n}", rows)
    for t in (1, 2, 3):
        rows = [("answer_match", None, 0.4 + 0.05 * t), ("response_loss", None, 1.0 - 0.05 * t)]
        rows += [("answer_match", task, series[t]) for task, series in TREND_SERIES.items()]
        _eval(con, evolving, "self-evolving", t, f"ab{t}", rows)
    store.finish_flow_run(con, fixed)  # readers see finished runs only
    store.finish_flow_run(con, evolving)
    con.close()
    out = build_report(db, tmp / "report.html", selection="global", n_samples=8)
    return {"db": db, "html": out, "text": out.read_text(), "selections": sel_out, "tokenizer": tok}


def test_classify_trend_definitions():
    assert classify_trend([0.1, 0.1, 0.2]) == "rising"
    assert classify_trend([0.5, 0.4, 0.4, 0.1]) == "falling"
    assert classify_trend([0.1, 0.3, 0.2, 0.4]) == "unstable"  # net gain, but not monotone
    assert classify_trend([0.3, 0.3001, 0.3005]) == "flat"
    assert classify_trend([0.5]) == classify_trend([None, 0.5]) == "n/a"
    assert classify_trend([0.2, None, 0.5]) == "rising"  # missing points are skipped
    for task, series in TREND_SERIES.items():
        assert classify_trend(series) == task


def test_report_sections_and_thresholds(run_db):
    text = run_db["text"]
    for anchor in ("runs", "overview", "scores", "sources", "comparison", "trends", "refreshes", "samples"):
        assert f'<section id="{anchor}">' in text
    assert "could not be built" not in text
    # one histogram per (scores, pool) that a selection ranks; each global threshold on its own chart only
    charts = re.findall(r'<h3 data-scores="([0-9a-f]+)">([^<]*)</h3><figure>(.*?)</figure>', text, re.S)
    titles = [c[1] for c in charts]
    assert titles == ["scores of global / local over D0,1,2", "scores of self-evolving@1 over D1",
                      "scores of self-evolving@2 over D2"]
    by_title = {c[1]: c[2] for c in charts}
    for name, method, _parts, _theta, _ in SELECTIONS:
        thr = run_db["selections"][name]["threshold"]
        line = f'class="threshold" data-selection="{name}"'
        if method == "global":
            mine = next(t for t in titles if name in t.removeprefix("scores of ").split(" over ")[0].split(" / "))
            assert line in by_title[mine] and f"keep score &gt;= {thr:.4g}" in by_title[mine]
            assert all(line not in c for t, c in by_title.items() if t != mine)
        else:
            assert line not in text
    assert len(re.findall(r'<rect class="bar"', charts[0][2])) > 10
    # overview: ingest summary and the quarantine reasons
    assert "rows_read" in text and "quarantine reason" in text
    assert "not JSON" in text or "JSON" in text


def test_histogram_counts_match_sql(run_db):
    con = store.connect(run_db["db"], read_only=True)
    try:
        n1 = con.execute("SELECT count(*) FROM token_scores WHERE scores = ?", [SCORES[1]]).fetchone()[0]
        n1_d1 = con.execute("SELECT count(*) FROM token_scores JOIN dataset_samples USING (sample_id) "
                            "WHERE scores = ? AND part = 1", [SCORES[1]]).fetchone()[0]
    finally:
        con.close()
    for title, n in (("scores of global / local over D0,1,2", n1), ("scores of self-evolving@1 over D1", n1_d1)):
        chart = re.search(rf"<h3 data-scores=\"{SCORES[1]}\">{title}</h3><figure>(.*?)</figure>", run_db["text"],
                          re.S).group(1)
        counts = [int(c) for c in re.findall(r"<title>bin \d+: (\d+) tokens</title>", chart)]
        assert sum(counts) == n and f"{title}: {n} scored tokens" in chart


def test_kept_fraction_per_source_equals_sql(run_db):
    con = store.connect(run_db["db"], read_only=True)
    try:
        sources = [r[0] for r in con.execute("SELECT DISTINCT source FROM dataset_samples ORDER BY 1").fetchall()]
        assert "extra.jsonl" in sources and "train.jsonl" in sources
        expected = {}
        for name, _, parts, _, key in SELECTIONS:
            for src, kept, pool in con.execute(
                    """SELECT d.source, count(st.sample_id), count(*) FROM response_tokens rt
                       JOIN dataset_samples d USING (sample_id)
                       LEFT JOIN selected_tokens st ON st.selection = ? AND st.sample_id = rt.sample_id
                                                    AND st.pos = rt.pos
                       WHERE d.dataset = ? AND d.part IN (SELECT unnest(?)) GROUP BY d.source""",
                    [key, DATASET, parts]).fetchall():
                expected[(name, src)] = kept / pool
    finally:
        con.close()
    got = {(html.unescape(s), html.unescape(src)): float(f) for s, src, f in re.findall(
        r'class="frac" data-selection="([^"]*)" data-source="([^"]*)" data-fraction="([^"]*)"', run_db["text"])}
    assert set(got) == set(expected)
    for key, frac in expected.items():
        assert got[key] == pytest.approx(frac, abs=1e-12), key
    assert got[("full", "train.jsonl")] == 1.0
    assert got[("global", "train.jsonl")] != got[("global", "extra.jsonl")]


def test_trend_table(run_db):
    text = run_db["text"]
    for task in TREND_SERIES:
        assert re.search(rf'<span class="trend trend-{task}" data-task="{task}">{task}</span>', text), task
    assert "rising</b> = every step is non-decreasing" in text  # the definition is spelled out
    assert "<th>reference (0)</th><th>iter 1</th><th>iter 2</th><th>iter 3</th>" in text


def test_comparison_table_reused(run_db):
    section = re.search(r'<section id="comparison">(.*?)</section>', run_db["text"], re.S).group(1)
    for label in ("base (no SFT)", "fixed-model global top-k", "self-evolving (Alg. 1)", "RHO local top-k"):
        assert html.escape(label) in section


def test_samples_escape_html_and_mark_kept_tokens(run_db):
    text = run_db["text"]
    assert "<script" not in text.lower() and "<b>club" not in text and "<i>always" not in text
    samples = re.findall(r'<div class="sample" data-sample-id="(\d+)">(.*?)</div></div>', text, re.S)
    assert len(samples) == 8
    shown = {}
    for sid, body in samples:
        toks = re.search(r'<div class="toks">(.*)', body, re.S).group(1)
        shown[int(sid)] = html.unescape(re.sub(r"<[^>]+>", "", toks))
    # the injected prompt is shown as text, byte for byte, and round-robin sampling reached the extra source
    assert any(INJECTED in s and "1 < 2 & 3 > 2" in s for s in shown.values())
    con = store.connect(run_db["db"], read_only=True)
    try:
        for sid, body in samples:
            kept = {r[0] for r in con.execute("SELECT pos FROM selected_tokens WHERE selection = 'f1' "
                                              "AND sample_id = ?", [int(sid)]).fetchall()}
            ids, mask = con.execute("SELECT input_ids, response_mask FROM samples WHERE sample_id = ?",
                                    [int(sid)]).fetchone()
            # the whole rendered sample decodes to the tokenizer's own decode of the sequence
            assert shown[int(sid)] == run_db["tokenizer"].decode(ids, skip_special_tokens=False,
                                                                 clean_up_tokenization_spaces=False)
            marks = re.findall(r'<span class="tk ([pkd])( mixed)?[^"]*" title="pos (\d+) ', body)
            for cls, mixed, pos in marks:
                pos = int(pos)
                if mixed:  # several tokens of one character, not all kept
                    continue
                assert cls == ("p" if not mask[pos] else "k" if pos in kept else "d"), (sid, pos)
            assert any(c == "k" for c, _, _ in marks) or not kept
    finally:
        con.close()
    assert "score +" in text or "score -" in text


def test_token_pieces_concatenate_to_decode(run_db):
    tok = run_db["tokenizer"]
    ids = tok("Zoë said «héllo» — naïve 日本 </s>")["input_ids"]
    pieces = token_pieces(tok, ids)
    assert "".join(t for _, t in pieces) == tok.decode(ids, skip_special_tokens=False,
                                                       clean_up_tokenization_spaces=False)
    assert [p for g, _ in pieces for p in g] == list(range(len(ids)))
    assert not any("\ufffd" in t for _, t in pieces)


def test_missing_pieces_become_notes(tiny, tmp_path):
    """A run with samples only (no scores, selections, metrics) and a tokenizer that moved away."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.model)
    res = ingest([str(tiny.train)], [], tok, max_length=256, eval_fraction=0.2, n_parts=2, seed=SEED)
    db = tmp_path / "run" / "tokenclean.duckdb"
    con = store.connect(db)
    insert_dataset(con, DATASET, res.samples, [], {"tokenizer": str(tmp_path / "gone")}, {})
    store.finish_flow_run(con, store.start_flow_run(con, "fixed-model-cleaning", {}, DATASET))
    con.close()
    text = build_report(db.parent, tmp_path / "r.html", selection="nope", n_samples=3).read_text()
    assert "could not be built" not in text
    assert "No token scores in this run" in text
    assert "no self-evolving iterations" in text
    assert "No ingest summary" in text and "No base model recorded" in text
    assert "No selections with kept tokens" in text
    assert "could not be loaded" in text and "[" in text  # token ids instead of text
    assert text.count('class="sample"') == 3


def test_cli_report_writes_default_path(run_db, tmp_path):
    from typer.testing import CliRunner

    from tokenclean.cli import app

    run_dir = tmp_path / "cli-run"
    run_dir.mkdir()
    shutil.copy(run_db["db"], run_dir / "tokenclean.duckdb")
    res = CliRunner().invoke(app, ["report", str(run_dir), "--selection", "self-evolving@2"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("report.html") and (run_dir / "report.html").exists()
    assert "Selection <b>self-evolving@2</b>" in (run_dir / "report.html").read_text()


def _data_attrs(tag: str) -> dict[str, str]:
    return {k: html.unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', tag)}


def _tags(text: str, pattern: str) -> list[dict[str, str]]:
    """The data- attributes of every opening tag matching ``pattern`` (a regex over the tag's start)."""
    return [_data_attrs(t) for t in re.findall(rf"<{pattern}[^>]*>", text)]


def _section_html(text: str, anchor: str) -> str:
    return re.search(rf'<section id="{anchor}">(.*?)</section>', text, re.S).group(1)


def test_histograms_count_on_a_log_scale(run_db):
    """Bar heights are log10(1 + count) of the tallest's, and the count axis is labelled in counts at 1, 10, ..."""
    charts = re.findall(r'<svg class="chart" data-yscale="log10\(1\+count\)"(.*?)</svg>',
                        _section_html(run_db["text"], "scores"), re.S)
    assert len(charts) == 4  # three score histograms, one of local's per-sample thresholds
    for chart in charts:
        assert "(log scale)</text>" in chart
        bars = [(int(c), float(h)) for c, h in re.findall(r'<rect class="bar" data-count="(\d+)"[^>]* height="([^"]+)"',
                                                           chart)]
        top = max(c for c, _ in bars)
        full = max(h for _, h in bars)
        for c, h in bars:
            assert h == pytest.approx(full * math.log10(1 + c) / math.log10(1 + top), abs=0.02), (c, h, top)
        ticks = [int(t) for t in re.findall(r'class="tick ytick" data-count="(\d+)"', chart)]
        powers = [10 ** i for i in range(len(str(top))) if 10 ** i <= top]
        assert ticks[:len(powers) + 1] == [0] + powers and set(ticks) <= {0, top, *powers}
    assert any(c < top / 100 for c, _ in bars), "the fixture's scores have no tail to show"


def _per_sample_thresholds(db: Path, selection: str, scores: str) -> list[float]:
    con = store.connect(db, read_only=True)
    try:
        kept = con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection = ?", [selection]).fetchall()
        score = {(s, p): v for s, p, v in con.execute("SELECT sample_id, pos, score FROM token_scores WHERE scores = ?",
                                                      [scores]).fetchall()}
    finally:
        con.close()
    low: dict[int, float] = {}
    for s, p in kept:
        low[s] = min(low.get(s, math.inf), score[(s, p)])
    return sorted(low.values())


def test_local_shows_its_per_sample_thresholds(run_db):
    """local draws no threshold line; its note gives the spread of each sample's lowest kept score."""
    section = _section_html(run_db["text"], "scores")
    (note,) = _tags(section, r'p class="local-thresholds"')
    assert note["selection"] == "local"
    thr = _per_sample_thresholds(run_db["db"], "f2", SCORES[1])
    assert int(note["keeping"]) == len(thr) and len(set(thr)) > 1
    assert float(note["min"]) == pytest.approx(thr[0]) and float(note["max"]) == pytest.approx(thr[-1])
    assert float(note["median"]) == pytest.approx(float(np.median(thr)))
    assert "keeps each sample's own top 0.6" in section and 'class="threshold" data-selection="local"' not in section
    small = re.search(r'<figure class="sample-thresholds" data-selection="local">(.*?)</figure>', section, re.S)
    assert sum(int(c) for c in re.findall(r'<rect class="bar" data-count="(\d+)"', small.group(1))) == len(thr)


def test_run_section_status_durations_and_stages_by_start(run_db):
    section = _section_html(run_db["text"], "runs")
    assert run_db["text"].index('<section id="runs">') < run_db["text"].index('<section id="scores">')
    con = store.connect(run_db["db"], read_only=True)
    try:
        runs = con.execute("SELECT flow_run, flow, epoch(finished_at) - epoch(started_at) FROM flow_runs "
                           "ORDER BY started_at").fetchall()
        logged = {fr: con.execute("SELECT stage, name, seconds FROM stage_log WHERE flow_run = ? ORDER BY finished_at",
                                  [fr]).fetchall() for fr, _, _ in runs}
    finally:
        con.close()
    rows = _tags(section, r'tr data-flow-run=')
    assert [(r["flow-run"], r["flow"], r["status"]) for r in rows] == [(fr, f, "finished") for fr, f, _ in runs]
    assert [float(r["seconds"]) for r in rows] == pytest.approx([s for _, _, s in runs])
    assert "unfinished" not in section
    for fr, _, _ in runs:
        stages = _tags(section.split(f'data-stages-of="{fr}"')[1].split("</table>")[0], r'tr class="stage"')
        assert sorted((s["stage"], s["name"], float(s["seconds"])) for s in stages) == sorted(logged[fr])
        starts = [s["start"] for s in stages]
        assert starts == sorted(starts)  # by start, not by the order they finished in
        assert [s["name"] for s in stages] != [n for _, n, _ in logged[fr]], "the fixture's stages start in log order"


def test_no_refresh_is_one_line(run_db):
    section = _section_html(run_db["text"], "refreshes")
    assert "No scheduled refresh (refresh-token-ranking) has finished" in section and "<table" not in section


REFRESHES = [  # (ingest detail or None: no dataset ingested, samples scored per model, theta_1 retrained, k)
    ({"ingested": True, "seconds": 2.0}, {"base": 40, "reference": 40}, True, 0.5),
    ({"ingested": True, "seconds": 1.0, "changes": {"unchanged": 30, "changed": 2, "added": 3, "removed": 1}},
     {"base": 5, "reference": 5}, False, 0.4),
    (None, {}, False, 0.4),
]


@pytest.fixture(scope="module")
def refreshed(run_db, tmp_path_factory):
    """The run database after three scheduled refreshes and a fourth killed midway, recorded through the store's
    functions as flows/cleaning.py ``refresh_ranking`` records them (a real refresh trains theta_1: too slow here)."""
    from tokenclean.report import REFRESH_FLOW

    tmp = tmp_path_factory.mktemp("report-refresh")
    db = tmp / "tokenclean.duckdb"
    shutil.copy(run_db["db"], db)
    con = store.connect(db)
    for n, (ingest_detail, scored, retrained, k) in enumerate(REFRESHES):
        fr = store.start_flow_run(con, REFRESH_FLOW, {"name": "nightly"}, DATASET)
        if ingest_detail:
            store.log_stage(con, fr, "ingest", "dataset", DATASET, ingest_detail["seconds"], ingest_detail)
        store.record_output(con, fr, "data", 0, "dataset", DATASET, ingest_detail is not None)
        for model, samples in scored.items():
            store.log_stage(con, fr, "score", model, f"s-{model}", 1.5, {"samples_scored": samples, "tokens": 99})
        store.record_output(con, fr, "reference", 0, "adapter", THETA[1], retrained)
        key = f"r{n}"
        if store.selection_record(con, key) is None:
            store.write_selection(con, key, "global", k, dataset=DATASET, parts=[0, 1, 2],
                                  pool=store.pool_digest(con, DATASET, [0, 1, 2]), scores=SCORES[1], seed=0)
        store.record_output(con, fr, "refresh", 1, "selection", key, True)
        store.finish_flow_run(con, fr)
    killed = store.start_flow_run(con, REFRESH_FLOW, {"name": "nightly"}, DATASET)
    con.close()
    out = build_report(db, tmp / "report.html", n_samples=1)
    return {"db": db, "text": out.read_text(), "killed": killed}


def test_refresh_history(refreshed):
    """One row per finished refresh, oldest first, with what the store records of it; the killed one is left out
    of the history and shown as unfinished in the run section."""
    text = refreshed["text"]
    section = _section_html(text, "refreshes")
    rows = _tags(section, r'tr class="refresh"')
    con = store.connect(refreshed["db"], read_only=True)
    try:
        runs = [r[0] for r in con.execute("SELECT flow_run FROM flow_runs WHERE flow = 'refresh-token-ranking' AND "
                                          "finished_at IS NOT NULL ORDER BY started_at").fetchall()]
        kept = con.execute("SELECT n_kept, n_candidates FROM selections WHERE selection IN ('r0', 'r1', 'r2') "
                           "ORDER BY selection").fetchall()
    finally:
        con.close()
    assert [r["flow-run"] for r in rows] == runs and len(runs) == len(REFRESHES)
    for row, (_, scored, _, _), (n_kept, n_cand) in zip(rows, REFRESHES, kept):
        assert int(row["scored"]) == sum(scored.values()) and row["dataset"] == DATASET
        assert (int(row["kept"]), int(row["candidates"])) == (n_kept, n_cand)
    assert kept[0] != kept[1]  # each refresh shows its own selection
    assert "changed 2, added 3, removed 1" in section and "first ingest" in section
    assert "no dataset ingested" in section and "retrained" in section
    runs_section = _section_html(text, "runs")
    status = {r["flow-run"]: r["status"] for r in _tags(runs_section, r'tr data-flow-run=')}
    assert status[refreshed["killed"]] == "unfinished" and status[runs[-1]] == "finished"
    assert "still running or was killed" in runs_section
    assert 'class="reused" data-stage="adapter"' in runs_section  # theta_1 kept by the last finished refresh


# ------------------------------------------------------------------------ Chromium

def _png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA PNG (all five filter types) into an (h, w, channels) array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:
            cur = (line + prev) % 256
        else:
            cur, up, x = [0] * (w * bpp), prev.tolist(), line.tolist()
            for i in range(w * bpp):
                a = cur[i - bpp] if i >= bpp else 0
                b = up[i]
                if f == 3:
                    cur[i] = (x[i] + (a + b) // 2) & 255
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa_, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[i] = (x[i] + (a if pa_ <= pb and pa_ <= pc else b if pb <= pc else c)) & 255
            cur = np.asarray(cur, dtype=np.int32)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)[:, :, :3]


def _near(px: np.ndarray, hex_color: str, tol: int = 6) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(px.astype(np.int32) - rgb).max(axis=2) <= tol).sum())


def _chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if exe is None:
        pytest.fail("headless Chromium is required to check the HTML report renders, and `chromium` is not "
                    "installed: run `apt-get install -y chromium` (Debian package `chromium`).")
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_report_renders_in_headless_chromium(run_db, tmp_path):
    exe = _chromium()
    url = run_db["html"].resolve().as_uri()
    shot = tmp_path / "shot.png"
    res = _run_chromium(exe, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3200", url)
    assert shot.exists(), f"no screenshot; chromium said:\n{res.stderr[-3000:]}"
    assert shot.stat().st_size > 20_000
    px = _png_pixels(shot)
    assert px.shape[:2] == (3200, 1200)  # down to the kept fractions, below the run section and histograms
    colours = np.unique(px.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50, "screenshot is (nearly) a single colour"
    assert _near(px, "#7a9cc6") > 2000, "histogram bars not rendered"
    assert _near(px, "#6cbf84") > 500, "kept-fraction bars not rendered"

    # the whole page (the samples come last): kept tokens green, dropped tokens red
    shot2 = tmp_path / "page.png"
    _run_chromium(exe, tmp_path / "profile", f"--screenshot={shot2}", "--window-size=1200,8000", url)
    px2 = _png_pixels(shot2)
    assert _near(px2, "#c8efd0") > 2000 and _near(px2, "#fbd3d3") > 1000, "token highlighting not rendered"

    dom = _run_chromium(exe, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert "<svg" in dom.stdout and 'class="threshold"' in dom.stdout
    assert '<table class="kept">' in dom.stdout and '<table class="trends">' in dom.stdout
    assert '<table class="runs">' in dom.stdout and 'data-yscale="log10(1+count)"' in dom.stdout
    assert dom.stdout.count('class="sample"') == 8
    assert "<script" not in dom.stdout.lower()
    keep = os.environ.get("TOKENCLEAN_REPORT_SHOTS")  # set to a folder to look at the screenshots
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for f in (shot, shot2, run_db["html"]):
            shutil.copy(f, Path(keep) / f.name)
