"""Only finished flow runs are current: a run killed half-way changes nothing `inspect`, `report` and `export`
read, and `inspect` and the report name it as unfinished.

A flow run records its outputs as it goes and is marked finished last (``flows/cleaning.py``), so a killed
run's row and partial outputs stay in the database; readers must skip them.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_config
from tests.faults import BACKEND, FAULT_ENV, crash_flow_runs_since, kill_tree, shard_first_ids
from tokenclean.cli import app
from tokenclean.config import RunConfig
from tokenclean.tasks import store

UNFINISHED = re.compile(r"^fixed-model-cleaning started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: "
                        r"unfinished \(running or killed\)$")


def _cfg(workdir: Path) -> dict:
    return tiny_config(workdir, name="current", mode="fixed", baselines=["global"], eval={"max_new_tokens": 0})


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    from tokenclean.flows.cleaning import run

    cfg = _cfg(tmp_path_factory.mktemp("current"))
    run(RunConfig.model_validate(cfg))
    return cfg


def _cli(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def _readers(run_dir: Path, out: Path) -> dict:
    """What a user reads of a run: inspect (table, keys, one sample), the report, the exported selection and
    model (adapter) of `global`."""
    data = out / "global.parquet"
    exported = json.loads(_cli("export", str(run_dir), "--selection", "global", "--out", str(data)))
    rows = pq.read_table(data).to_pylist()
    model = json.loads(_cli("export", str(run_dir), "--model", "global", "--adapter-only",
                            "--out", str(out / "adapter")))
    html = (run_dir / "report.html")
    _cli("report", str(run_dir), "--out", str(html))
    return {"inspect": _cli("inspect", str(run_dir)).splitlines(),
            "sample": _cli("inspect", str(run_dir), "--sample", rows[0]["id"], "--selection", "global"),
            "report": html.read_text(), "rows": rows, "selections": exported["selections"],
            "adapter": (model["variant"], model["adapter"])}


def _killed_run(cfg: dict, tmp_path: Path) -> None:
    """`tokenclean run` on the same run directory, SIGKILLed (with every process it started) while it scores:
    its flow run is recorded with the outputs made so far and never finished. Another scorer backend gives
    the base model's losses a new key, so the run has something to score, and stalls its first shard."""
    cfg = dict(cfg, score=dict(cfg["score"], backend=BACKEND))
    first = shard_first_ids(RunConfig.model_validate(cfg), list(range(1, cfg["iterations"] + 1)))[0]  # the pool
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    marker, log = tmp_path / "stalled", tmp_path / "killed.log"
    started = time.time()
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tokenclean.cli", "run", str(path)], stdout=err, stderr=err,
                                env=dict(os.environ, **{FAULT_ENV: f"stall:base:{first}:{marker}"}))
    try:
        deadline = time.monotonic() + 600
        while not (marker.exists() and marker.read_text()):
            assert proc.poll() is None, f"the run ended before it stalled: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run never stalled"
            time.sleep(0.2)
    finally:
        kill_tree(proc)
        crash_flow_runs_since(started)


def test_a_killed_run_changes_nothing_readers_see_and_is_shown_unfinished(finished, tmp_path):
    """After a finished run, a second run of the same flow is killed mid-scoring. inspect (table, artifact keys,
    a sample's kept tokens), the report and both exports of `global` read exactly what they read before;
    inspect adds one line naming the unfinished run, the report a note."""
    run_dir = RunConfig.model_validate(finished).run_dir
    before = _readers(run_dir, tmp_path / "before")
    assert not any(UNFINISHED.match(line) for line in before["inspect"])
    assert any(line.startswith("fixed-model global top-k") for line in before["inspect"])

    _killed_run(finished, tmp_path)
    con = store.connect(run_dir / "tokenclean.duckdb", read_only=True)
    try:
        unfinished = store.unfinished_flow_runs(con)
    finally:
        con.close()
    assert [r["flow"] for r in unfinished] == ["fixed-model-cleaning"]  # the killed run is recorded, unfinished

    after = _readers(run_dir, tmp_path / "after")
    marked = [line for line in after["inspect"] if UNFINISHED.match(line)]
    assert len(marked) == 1, after["inspect"]
    assert [line for line in after["inspect"] if line not in marked] == before["inspect"]
    for what in ("sample", "rows", "selections", "adapter"):
        assert after[what] == before[what], what
    note = ("fixed-model-cleaning started [^:]*:[^:]*:[^:]*: unfinished \\(running or killed\\); this report shows "
            "the latest finished run of each flow")
    assert len(re.findall(note, after["report"])) == 1 and not re.search(note, before["report"])

    def runs_section(html: str) -> str:
        return re.search(r'<section id="runs">.*?</section>', html, re.S).group(0)

    # the flow-runs section is the one place that shows the killed run, as unfinished, beside the finished one
    assert "unfinished" not in runs_section(before["report"])
    assert 'status-unfinished">unfinished<' in runs_section(after["report"])

    def strip(html: str) -> str:  # the generation time, the note and the flow-runs section are what may differ
        html = re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d", "", html)
        html = html.replace(runs_section(html), "")
        return re.sub(f'<p class="note">{note}</p>', "", html)

    assert strip(after["report"]) == strip(before["report"])


def test_current_outputs_are_those_of_the_latest_finished_run_of_each_flow(tmp_path):
    """Random histories of flow runs (two flows and lm-eval, each run finished or not, on one of two datasets),
    written with the store functions the flows call: after every run, what readers see is the model's answer
    (the latest finished run of each flow, a variant from the newest of those that recorded it), and the
    unfinished runs listed are the flows whose latest run did not finish."""
    rng = random.Random(22)
    made = {"fixed-model-cleaning": ["base", "global", "random"], "self-evolving-cleaning": ["base", "self-evolving"],
            "refresh-token-ranking": ["base", "refresh"]}
    for history in range(6):
        con = store.connect(tmp_path / f"h{history}.duckdb")
        runs = []  # (flow, flow_run, dataset, finished, {variant: key})
        for step in range(rng.randint(1, 8)):
            flow = rng.choice(list(made))
            dataset = rng.choice(["d1", "d2"])
            flow_run = store.start_flow_run(con, flow, {}, dataset)
            outputs = {v: f"{v}-{history}-{step}" for v in made[flow] if rng.random() < 0.8}
            for variant, key in outputs.items():
                store.record_output(con, flow_run, variant, 1, "selection", key, True)
            done = rng.random() < 0.6
            if done:
                store.finish_flow_run(con, flow_run)
            runs.append((flow, flow_run, dataset, done, outputs))
            time.sleep(0.002)  # flow runs are ordered by their start time

            latest = {}  # flow -> its latest finished run
            for r in runs:
                if r[3]:
                    latest[r[0]] = r
            want = {}
            for r in sorted(latest.values(), key=runs.index):  # a variant from the newest finished run that has it
                for variant, key in r[4].items():
                    want[variant] = (key, r[1], r[2])
            got = {o["variant"]: (o["key"], o["flow_run"], o["dataset"]) for o in store.current_outputs(con)}
            assert got == want, (history, step)
            newest = {r[0]: r for r in runs}
            assert {r["flow_run"] for r in store.unfinished_flow_runs(con)} == \
                {r[1] for r in newest.values() if not r[3]}
            assert {r["flow_run"] for r in store.latest_flow_runs(con)} == {r[1] for r in latest.values()}
            finished_runs = [r for r in runs if r[3]]
            assert store.latest_dataset(con) == (finished_runs[-1][2] if finished_runs else None)
        con.close()
