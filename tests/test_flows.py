"""Both flows end to end, run as `tokenclean demo` on the test-sized embedded default: a real Prefect
flow run (local API server), scoring on a real local Ray cluster, a real DuckDB file, the tiny real model.
Then a rerun resumes."""
import json
import os
import re

import pytest

from tests.conftest import tiny_config
from tokenclean.config import RunConfig
from tokenclean.tasks import store


def _overrides(tree: dict, prefix: str = "") -> list[str]:
    """``--set`` arguments that give a config ``tree``'s every leaf (values as YAML: JSON is YAML)."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


@pytest.fixture(scope="module")
def demo(tiny, tmp_path_factory):
    """`tokenclean demo` with the embedded default at test size (and the test's training settings), watched:
    every torch module constructed in this process (the flow process) while it runs is kept, and
    ``inspect`` is read right after it. The trainings record their begin/end events (``tests.train_events``)."""
    import torch
    from typer.testing import CliRunner

    import tokenclean.flows.cleaning  # noqa: F401  (Prefect sets its log handlers up on this stderr, not the runner's)
    from tokenclean.cli import app
    from tokenclean.config import load_config

    workdir = tmp_path_factory.mktemp("runs")
    want = tiny_config(workdir)
    want["train"] = want["train"] | {"callbacks": ["tests.train_events:Rendezvous"]}
    want["baselines"] = ["full", "random", "local", "global", "sample", "weighted"]  # the demo's
    built = []
    init = torch.nn.Module.__init__

    def watched(self, *a, **kw):
        built.append(self)
        init(self, *a, **kw)

    env = dict(os.environ)
    torch.nn.Module.__init__ = watched
    try:
        res = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), *(f"--set={o}" for o in _overrides(want))])
    finally:
        torch.nn.Module.__init__ = init
        # what the command set for its own process (quieter Prefect and Ray logs) ends with it, as a process would
        for name in set(os.environ) - set(env):
            del os.environ[name]
        os.environ.update(env)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    cfg = RunConfig.model_validate(want)
    # the run the demo made is exactly the test configuration, and the one every test below reads
    assert load_config(cfg.run_dir / "config.yaml") == cfg
    inspected = CliRunner().invoke(app, ["inspect", str(cfg.run_dir)])
    assert inspected.exit_code == 0, inspected.output
    return {"cfg": cfg, "output": res.output, "modules_built_here": built, "inspect": inspected.output}


@pytest.fixture(scope="module")
def finished_run(demo):
    return demo["cfg"]


@pytest.fixture(scope="module")
def rerun(finished_run):
    """The same run again: every key is stored complete. Returns the stage-log sizes around it."""
    from tokenclean.flows.cleaning import run

    before = _q(finished_run, "SELECT count(*) FROM stage_log")[0][0]
    run(finished_run)
    return before, _q(finished_run, "SELECT count(*) FROM stage_log")[0][0]


def _q(cfg, sql, params=None):
    con = store.connect(cfg.db_path, read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _out(cfg, name, kind):
    from tokenclean.summary import output_key

    con = store.connect(cfg.db_path, read_only=True)
    try:
        return output_key(con, name, kind)
    finally:
        con.close()


def _pool_tokens(cfg, parts):
    ds = _out(cfg, "data", "dataset")
    return _q(cfg, "SELECT count(*) FROM response_tokens rt JOIN dataset_samples d USING (sample_id) "
                   f"WHERE d.dataset = ? AND d.part IN ({','.join(map(str, parts))})", [ds])[0][0]


def test_every_response_token_scored_once_per_model(finished_run):
    cfg = finished_run
    n_resp = _pool_tokens(cfg, [1, 2])  # select.pool: exclude_warmup, so D0 (the reference's data) is not scored
    by_model = dict(_q(cfg, "SELECT model, count(*) FROM token_losses GROUP BY model"))
    assert by_model[_out(cfg, "base", "losses")] == n_resp  # base scored once over the pool, shared by both flows
    assert by_model[_out(cfg, "reference", "losses")] == n_resp
    # theta_2 (the adapter of self-evolving iteration 1) only scores D2
    assert by_model[_out(cfg, "self-evolving@1", "losses")] == _pool_tokens(cfg, [2])
    assert len(by_model) == 3
    dupes = _q(cfg, "SELECT count(*) FROM (SELECT model, sample_id, pos FROM token_losses GROUP BY ALL "
                    "HAVING count(*) > 1)")[0][0]
    assert dupes == 0


def test_each_ray_worker_loads_the_model_once(finished_run):
    details = [json.loads(d) for (d,) in _q(finished_run, "SELECT detail FROM stage_log WHERE stage = 'score'")]
    assert details and all(d["workers"] for d in details)
    for d in details:  # worker pid -> distinct model objects that scored its shards
        assert set(d["workers"].values()) == {1}, d["workers"]
    assert sum(d["shards_scored"] for d in details) > sum(len(d["workers"]) for d in details)


def test_algorithm_1_artifacts(finished_run):
    cfg = finished_run
    names = ["reference", "full", "random", "local", "global", "sample", "weighted", "self-evolving@1",
             "self-evolving@2"]
    adapters = {n: _out(cfg, n, "adapter") for n in names}
    assert all(adapters.values()) and len(set(adapters.values())) == len(names)
    assert sorted(p.name for p in (cfg.run_dir / "adapters").iterdir()) == sorted(adapters.values())
    t3 = json.loads((cfg.run_dir / "adapters" / adapters["self-evolving@2"] / "train.json").read_text())
    assert t3["init_adapter"].endswith(adapters["self-evolving@1"])  # theta_3 continues theta_2
    sels = {n: _q(cfg, "SELECT method, scores, n_kept, n_candidates FROM selections WHERE selection = ?",
                  [_out(cfg, n, "selection")])[0] for n in ("global", "random", "self-evolving@1", "self-evolving@2")}
    assert sels["self-evolving@1"][0] == sels["self-evolving@2"][0] == "global"
    # both ranked by theta_1's scores: the same key in the fixed flow and in iteration 1
    assert sels["self-evolving@1"][1] == sels["global"][1] == _out(cfg, "self-evolving@1", "scores")
    assert sels["self-evolving@2"][1] == _out(cfg, "self-evolving@2", "scores")
    for name in ("global", "random", "self-evolving@1"):
        kept, cand = sels[name][2:]
        assert cand > 0 and kept == round(cfg.select.k * cand)
    # scores of iteration 2 are base - theta_2 over D2
    joined, bad = _q(cfg, """SELECT count(*), count(*) FILTER (WHERE abs(ts.score - (b.loss - r.loss)) > 1e-6)
                     FROM token_scores ts
                     JOIN token_losses b ON b.model = ? AND b.sample_id = ts.sample_id AND b.pos = ts.pos
                     JOIN token_losses r ON r.model = ? AND r.sample_id = ts.sample_id AND r.pos = ts.pos
                     WHERE ts.scores = ?""",
                     [_out(cfg, "base", "losses"), _out(cfg, "self-evolving@1", "losses"),
                      _out(cfg, "self-evolving@2", "scores")])[0]
    assert joined == _pool_tokens(cfg, [2]) > 0  # every response token of D2 compared, not an empty join
    assert bad == 0


def test_metrics_recorded_for_every_variant(finished_run):
    from tokenclean.summary import metrics_rows

    con = store.connect(finished_run.db_path, read_only=True)
    try:
        rows = metrics_rows(con)
    finally:
        con.close()
    em = {(r["variant"], r["iteration"]) for r in rows if r["metric"] == "answer_match" and r["task"] == "all"}
    assert {v for v, _ in em} == {"base", "reference", "full", "random", "local", "global", "sample", "weighted",
                                  "self-evolving"}
    assert sorted(i for v, i in em if v == "self-evolving") == [1, 2]


def test_cleaning_drops_corrupted_tokens(finished_run):
    """The claim of the method, on data with known labels: the global selection keeps a much
    smaller share of corrupted tokens than the full token set, and the reference's scores
    rank informative tokens above filler on average.

    (Precision over informative tokens at k = 0.6 is not asserted: on this tiny model it sat
    within 0.2 points of the base rate with the old hand-written loop as with the Trainer.)
    """
    def corrupted_share(variant: str) -> float:
        return _q(finished_run, "SELECT avg((r.truth = 2)::INT) FROM selected_tokens k JOIN response_tokens r "
                                "USING (sample_id, pos) WHERE k.selection = ?",
                  [_out(finished_run, variant, "selection")])[0][0]

    assert corrupted_share("global") < 0.6 * corrupted_share("full")
    scores = _q(finished_run, "SELECT scores FROM selections WHERE selection = ?",
                [_out(finished_run, "global", "selection")])[0][0]
    by_truth = dict(_q(finished_run, "SELECT r.truth, avg(s.score) FROM token_scores s JOIN response_tokens r "
                                     "USING (sample_id, pos) WHERE s.scores = ? GROUP BY 1", [scores]))
    assert by_truth[1] > by_truth[0] > by_truth[2]  # informative > filler > corrupted


def test_rerun_resumes_without_rescoring_or_retraining(rerun):
    before, after = rerun
    assert before > 0 and after == before  # every key was stored complete: no stage ran


def test_flow_runs_are_recorded_in_prefect(finished_run):
    import asyncio
    from functools import partial

    from prefect.client.orchestration import get_client

    from tokenclean.flows.runtime import artifact_key, prefect_api

    async def read():
        async with get_client() as c:
            runs = await c.read_flow_runs()
            arts = await c.read_artifacts()
            return [(r.id, r.state_type.value, ((r.parameters or {}).get("config") or {}).get("workdir"))
                    for r in runs], arts

    with prefect_api():
        runs, arts = asyncio.run(read())
    # this run's flows, two per `run` (a re-run of it may have come since; the session's server also holds other
    # tests' runs, killed ones among them)
    mine = [state for _, state, workdir in runs if workdir == finished_run.workdir]
    assert len(mine) >= 2 and len(mine) % 2 == 0 and set(mine) == {"COMPLETED"}, runs
    by_key = {a.key: a for a in arts if a.key}
    assert "self-evolving@1" not in by_key  # keys are slugs
    key = partial(artifact_key, finished_run.name)
    summaries = [a.data for a in arts if a.key == key("token-cleaning-summary")]
    assert len(summaries) >= 2  # one per flow run
    assert any("self-evolving (Alg. 1)" in d for d in summaries)
    assert any("fixed-model global top-k" in d for d in summaries)
    assert {key("score-base"), key("score-reference"), key("score-self-evolving-1"),
            key("token-cleaning-metrics")} <= set(by_key)
    # only this run's progress: the server also holds killed runs whose scoring stopped partway
    my_ids = {run_id for run_id, _, workdir in runs if workdir == finished_run.workdir}
    progress = [a for a in arts if a.type == "progress" and a.key == key("score-base") and a.flow_run_id in my_ids]
    assert progress and {float(a.data) for a in progress} == {100.0}
    assert all(re.fullmatch(r"([\d,]+) of \1 tokens, shards (\d+)/\2, \d+ s, [\d,]+ tok/s", a.description)
               for a in progress), [a.description for a in progress]  # the totals and the elapsed time are kept


async def _all(read, **filters) -> list:
    """Every object a Prefect client ``read`` returns, page by page (the server caps a page at 200)."""
    out: list = []
    while True:
        page = await read(limit=200, offset=len(out), **filters)
        out += page
        if len(page) < 200:
            return out


def _prefect_view(cfg) -> dict:
    """What the Prefect UI shows of ``cfg``'s runs: its flow runs (with their flow's name), their task runs and
    artifacts, read through the API of the session's server."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async def read():
        async with get_client() as c:
            runs = [r for r in await _all(c.read_flow_runs)
                    if ((r.parameters or {}).get("config") or {}).get("workdir") == cfg.workdir]
            flows = {r.flow_id: (await c.read_flow(r.flow_id)).name for r in runs}
            ids = [r.id for r in runs]
            tasks = await _all(c.read_task_runs, flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            arts = await _all(c.read_artifacts,
                              artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
            logs = await _all(c.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            return {"runs": [(r, flows[r.flow_id]) for r in runs], "tasks": tasks, "artifacts": arts, "logs": logs}

    return asyncio.run(read())


def test_prefect_names_and_tags_every_run_and_task_and_keys_artifacts_by_run_name(demo, rerun):
    """The UI tells runs, tasks and pipelines apart: each flow run is `<run name>/<flow>/<UTC start>` and tagged
    with the run's name, config digest and dataset key; the two flows of one `run` call share an invocation tag that no other
    call has; task runs read as stage/variant; every artifact key starts with the run's name; and the comparison
    table artifact has the printed table's rows and cells."""
    import re
    from datetime import datetime

    from tokenclean.flows.runtime import artifact_key
    from tokenclean.summary import COLUMNS
    from tokenclean.tasks import keys

    cfg = demo["cfg"]
    view = _prefect_view(cfg)
    config_tag = f"config:{keys.digest('config', cfg.model_dump(mode='json'))}"
    con = store.connect(cfg.db_path, read_only=True)
    dataset_tag = f"dataset:{store.last_ingested_dataset(con)}"
    con.close()
    calls: dict[str, list[str]] = {}
    for run, flow in view["runs"]:
        named = re.fullmatch(rf"{re.escape(cfg.name)}/{flow}/(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", run.name)
        assert named, run.name
        started = datetime.strptime(named[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=run.start_time.tzinfo)
        assert abs((started - run.start_time).total_seconds()) < 60, (run.name, run.start_time)
        assert {"tokenclean", f"run:{cfg.name}", config_tag, dataset_tag} <= set(run.tags), run.tags
        assert [t for t in run.tags if t.startswith("dataset:")] == [dataset_tag], run.tags
        (call,) = [t for t in run.tags if t.startswith("invocation:")]
        calls.setdefault(call, []).append(flow)
    assert len(calls) >= 2, calls  # the demo and its re-run
    assert all(sorted(flows) == ["fixed-model-cleaning", "self-evolving-cleaning"] for flows in calls.values()), calls

    names = {t.name for t in view["tasks"]}
    label = r"[a-z0-9@.\-]+"
    assert all(re.fullmatch(rf"(train|evaluate|select)/{label}|score/{label}/\d+|ingest/[0-9a-f]+", n)
               for n in names), names
    assert f"ingest/{dataset_tag.removeprefix('dataset:')}" in names, names  # ingest is on the graph
    fixed = ["full", "random", "local", "global", "sample", "weighted"]
    made = ["reference", *fixed, "self-evolving@1", "self-evolving@2"]
    assert {f"{stage}/{v}" for stage in ("train", "evaluate", "select") for v in made} | {"evaluate/base"} <= names
    scored = {n.rsplit("/", 1)[0] for n in names if n.startswith("score/")}
    assert scored == {"score/base", "score/reference", "score/self-evolving@1"}, scored

    arts = view["artifacts"]
    assert arts and all(a.key.startswith(f"{cfg.name}-") for a in arts if a.key), [a.key for a in arts]
    assert {artifact_key(cfg.name, w) for w in ("token-cleaning-summary", "token-cleaning-comparison",
                                                  "token-cleaning-metrics", "score-base")} <= {a.key for a in arts}
    table = max((a for a in arts if a.key == artifact_key(cfg.name, "token-cleaning-comparison")),
                key=lambda a: a.created)
    rows = {r["variant"]: r for r in json.loads(table.data)}
    printed = _printed_table(demo["output"])
    assert set(rows) == set(printed)

    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    assert {lab: {key: cell(r[head]) for key, head, _ in COLUMNS} for lab, r in rows.items()} == printed
    # the metrics table: wide, one row per model and task, labelled as the comparison labels them
    metrics = json.loads(max((a for a in arts if a.key == artifact_key(cfg.name, "token-cleaning-metrics")),
                             key=lambda a: a.created).data)
    assert {m["variant"] for m in metrics} <= set(printed) and {m["name"] for m in metrics} >= {"global", "sample"}
    assert len({(m["name"], m["task"]) for m in metrics}) == len(metrics)
    assert all({"answer_match", "response_loss"} <= set(m) for m in metrics if m["task"] == "all")


def test_the_flow_run_logs_say_what_each_stage_computed_or_reused(demo, rerun):
    """The Logs tab of a flow run is the stage log: each computed step with its key and time, each reused one with
    its key, and the dataset it worked on with what ingest refused."""
    import re

    cfg = demo["cfg"]
    info = [log.message for log in _prefect_view(cfg)["logs"] if log.level == 20]
    adapter, dataset = _out(cfg, "global", "adapter"), _out(cfg, "data", "dataset")
    assert any(re.fullmatch(rf"train global: computed {adapter} in [0-9.]+ s", m) for m in info), info
    assert f"adapter global: reused {adapter}" in info  # the re-run found it by key
    assert any(m.startswith(f"dataset {dataset}: ingested in ") and m.endswith("rows quarantined") for m in info)
    assert any(m.startswith(f"dataset {dataset}: reused;") for m in info)
    assert not [m for m in info if "RESUME" in m or "LOAD_GLOBAL" in m]  # no bytecode from dill's detect in the log


def _artifact_lines(output: str) -> dict:
    """(name, kind) -> (key, status) of every artifact line of ``inspect``."""
    head = "artifacts of the latest run of each flow"
    lines = output.split(head, 1)[1].splitlines()[1:]
    return {(f[0], f[1]): (f[2], f[3]) for f in (ln.split() for ln in lines) if len(f) >= 4}


def test_inspect_lists_every_artifact_with_its_key_and_inputs(demo, rerun):
    """Every artifact with its key and whether the latest run computed it: after the first run, what the fixed
    flow made is computed; after a re-run that found every key, everything is reused."""
    from typer.testing import CliRunner

    from tokenclean.cli import app

    cfg = demo["cfg"]
    res = CliRunner().invoke(app, ["inspect", str(cfg.run_dir)])
    assert res.exit_code == 0, res.output
    first, again = _artifact_lines(demo["inspect"]), _artifact_lines(res.output)
    con = store.connect(cfg.db_path, read_only=True)
    try:
        from tokenclean.summary import artifacts

        listed = {(a["name"], a["kind"]): a["key"] for a in artifacts(con)}
    finally:
        con.close()
    assert len(listed) > 20 and set(first) == set(again) == set(listed)
    assert {name_kind: key for name_kind, (key, _) in again.items()} == listed
    assert {status for _, status in again.values()} == {"reused"}  # the re-run computed nothing
    made_by_the_first = [(n, k) for n in ("full", "random", "local", "global", "sample", "weighted", "self-evolving@1",
                                          "self-evolving@2")
                         for k in ("selection", "adapter", "eval")]
    assert all(first[nk][1] == "computed" for nk in made_by_the_first), first
    assert first[("base", "model")][1] == "reused"  # the base is an input, never computed by a run
    for name, kind in (("global", "selection"), ("self-evolving@2", "adapter"), ("reference", "losses"),
                       ("base", "eval")):
        assert again[(name, kind)][0] == _out(cfg, name, kind)
    assert '"method": "global"' in res.output and '"parent_model"' in res.output  # what each was derived from
    uid = _q(cfg, "SELECT s.uid FROM selected_tokens st JOIN samples s USING (sample_id) WHERE "
                  "st.selection = ? LIMIT 1", [_out(cfg, "global", "selection")])[0][0]
    one = CliRunner().invoke(app, ["inspect", str(cfg.run_dir), "--sample", uid, "--selection", "global"])
    assert one.exit_code == 0, one.output
    assert "KEEP" in one.output and _out(cfg, "global", "selection") in one.output


def test_the_fixed_model_variants_train_at_the_same_time(finished_run):
    """Once the reference has scored the pool the variants are independent: on the 2-CPU test cluster (one CPU
    per training task) two of them train at once. Read from the order of the events the trainings recorded
    (``tests.train_events``: each holds at its start until another has started, so a run whose trainings went one
    at a time would have failed): two fixed variants began before any training ended."""
    from tests.train_events import read_events

    events = read_events(finished_run.run_dir)
    fixed = {_out(finished_run, m, "adapter"): m for m in ("full", "random", "local", "global")}
    began = [e["key"] for e in events if e["event"] == "begin"]
    assert set(fixed) <= set(began), events
    first_end = next(i for i, e in enumerate(events) if e["event"] == "end")
    assert len({e["key"] for e in events[:first_end] if e["event"] == "begin"} & set(fixed)) >= 2, events
    ends = [e["key"] for e in events if e["event"] == "end"]
    assert all(ends.count(k) == 1 for k in fixed)  # every fixed variant trained to its end, once


def _printed_table(output: str) -> dict[str, dict[str, str]]:
    """The comparison table `tokenclean demo` printed, cell by cell (``summary.COLUMNS`` widths, one space apart)."""
    from tokenclean.summary import COLUMNS

    lines = output.splitlines()
    top = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["variant", "kept/pool"])
    rows = {}
    for line in lines[top + 2:]:
        if not line.strip():
            break
        cells, at = {}, 0
        for key, _, width in COLUMNS:
            cells[key] = line[at:at + width].strip()
            at += width + 1
        rows[cells["variant"]] = cells
    return rows


def test_demo_prints_every_cell_and_the_tables_invariants(demo):
    """The demo's table, as printed: every variant and every cell that applies to it; `full` keeps every
    informative and every corrupted token; random, local and global spend the same budget, round(k N) of the
    same pool; random keeps corrupted tokens at rate k, within 4 standard deviations of sampling round(k N)
    of N tokens without replacement (hypergeometric)."""
    import math

    from tokenclean.summary import VARIANTS

    cfg, k = demo["cfg"], demo["cfg"].select.k
    table = _printed_table(demo["output"])
    labels = dict((variant, lab) for lab, variant in VARIANTS)
    assert set(table) == {labels[v] for v in ("base", "reference", "full", "random", "local", "global", "sample",
                                             "weighted", "self-evolving")}
    selection_cells = ("kept", "by_part", "precision", "recall", "corrupted_kept")
    for variant, lab in labels.items():
        if lab not in table:
            continue
        row = table[lab]
        for cell, value in row.items():
            missing = cell in selection_cells and variant in ("base", "reference")  # no cleaning result
            assert (value == "-") == missing, (lab, cell, value)
    n_pool = _pool_tokens(cfg, [1, 2])
    n_bad = _q(cfg, "SELECT count(*) FROM response_tokens rt JOIN dataset_samples d USING (sample_id) "
                    "WHERE d.dataset = ? AND d.part IN (1, 2) AND rt.truth = 2", [_out(cfg, "data", "dataset")])[0][0]
    full = table[labels["full"]]
    assert full["kept"] == f"{n_pool}/{n_pool}" and full["recall"] == full["corrupted_kept"] == "1.000"
    budget = f"{round(k * n_pool)}/{n_pool}"
    assert [table[labels[v]]["kept"] for v in ("random", "local", "global")] == [budget] * 3
    # weighted trains every scored token; sample spends global's budget in whole samples, within half of one
    assert table[labels["weighted"]]["kept"] == full["kept"]
    longest = _q(cfg, "SELECT max(n_response) FROM samples JOIN dataset_samples d USING (sample_id) "
                      "WHERE d.dataset = ? AND d.part IN (1, 2)", [_out(cfg, "data", "dataset")])[0][0]
    sample_kept = int(table[labels["sample"]]["kept"].split("/")[0])
    assert abs(sample_kept - round(k * n_pool)) <= longest / 2
    per_part = sum(round(k * _pool_tokens(cfg, [t])) for t in (1, 2))  # each iteration keeps round(k N_t) of D_t
    assert table[labels["self-evolving"]]["kept"] == f"{per_part}/{n_pool}"
    sd = math.sqrt(k * (1 - k) / n_bad * (n_pool - n_bad) / (n_pool - 1))
    assert n_bad > 0 and 4 * sd < 0.25, (n_bad, sd)  # a bound that could fail
    assert abs(float(table[labels["random"]]["corrupted_kept"]) - k) <= 4 * sd + 5e-4  # printed to 3 decimals


def test_the_flow_process_never_loads_a_model(demo):
    """README: "The flow process never loads a model": scoring, training and evaluation are Ray work. No torch
    module holding weights (a model, an adapter, any layer of them) was constructed in the process that ran the
    demo's flows. (Importing transformers' modeling code builds weightless activation modules; those are not
    models.)"""
    weighted = [f"{type(m).__qualname__}: {sum(p.numel() for p in m.parameters())}" for m in demo["modules_built_here"]
                if any(True for _ in m.parameters())]
    assert weighted == []


def test_export_of_self_evolving_is_every_iteration_and_the_last_model(finished_run, tmp_path):
    """`export --selection self-evolving`: D1..DT, each sample with the kept tokens and the scores of its own
    iteration's selection. `export --model self-evolving`: theta_(T+1), the last iteration's adapter merged."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from tokenclean.cli import app

    cfg = finished_run
    res = CliRunner().invoke(app, ["export", str(cfg.run_dir), "--selection", "self-evolving", "--format", "parquet",
                                   "--out", str(tmp_path / "se.parquet")])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(tmp_path / "se.parquet").to_pylist()
    part = dict(_q(cfg, "SELECT sample_id, part FROM dataset_samples WHERE dataset = ?", [_out(cfg, "data", "dataset")]))
    assert {part[r["sample_id"]] for r in rows} == {1, 2}
    for t in (1, 2):
        sel = _out(cfg, f"self-evolving@{t}", "selection")
        stored = {(s, p): score for s, p, score in _q(
            cfg, "SELECT st.sample_id, st.pos, ts.score FROM selected_tokens st JOIN selections USING (selection) "
                 "JOIN token_scores ts ON ts.scores = selections.scores AND ts.sample_id = st.sample_id "
                 "AND ts.pos = st.pos WHERE st.selection = ?", [sel])}
        mine = [r for r in rows if part[r["sample_id"]] == t]
        exported = {(r["sample_id"], i): r["token_scores"][i] for r in mine for i, lab in enumerate(r["labels"])
                    if lab != -100}
        assert stored and exported.keys() == stored.keys(), t
        assert all(abs(exported[key] - stored[key]) < 1e-5 for key in stored), t  # the scores of its own iteration

    out = tmp_path / "model"
    res = CliRunner().invoke(app, ["export", str(cfg.run_dir), "--model", "self-evolving", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "tokenclean.json").read_text())
    last = _out(cfg, "self-evolving@2", "adapter")
    assert manifest["variant"] == "self-evolving@2" and manifest["adapter"] == last
    con = store.connect(cfg.db_path, read_only=True)
    try:
        paths = {t: cfg.run_dir / store.adapter_record(con, _out(cfg, f"self-evolving@{t}", "adapter"))["path"]
                 for t in (1, 2)}
        base_path = store.model_inputs(con, _out(cfg, "base", "model"))["path"]
    finally:
        con.close()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("<|user|>\nWhere does Ana live?\n<|assistant|>\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        by_iteration = {t: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(p)).eval()(
            ids).logits for t, p in paths.items()}
    assert torch.allclose(merged, by_iteration[2], atol=1e-4), float((merged - by_iteration[2]).abs().max())
    assert not torch.allclose(merged, by_iteration[1], atol=1e-3)  # theta_3, not theta_2
