"""The invariant behind every stored result: an incremental re-run equals a fresh run.

For each kind of change a user makes to an existing run directory, re-running must give
the same token losses, selections, adapters and metrics as a fresh run of the final
config in an empty directory, and must recompute exactly the steps the change reaches
(counted from the stage log, which records a step only when it computed something).
Real components throughout: Prefect flow runs, a DuckDB file, the tiny embedded Llama;
the thread task runner instead of Ray keeps the matrix within CI time (Ray scoring is
covered by test_flows and test_reliability).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.ingest_helpers import sample_arrays
from tests.store_reads import losses_by_uid
from tokenclean.config import RunConfig
from tokenclean.tasks import store
from tokenclean.tasks.ingest import assign_part

N_TRAIN, N_EVAL, T = 90, 12, 2
FIXED = ["full", "random", "local", "global"]
SE = [f"self-evolving@{t}" for t in range(1, T + 1)]
ALL_SELECTIONS = ["reference", *FIXED, *SE]


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _write(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _part(uid: str, n_parts: int = T + 1) -> int:
    return assign_part(uid, 0, 0.0, n_parts, False)


def _config(workdir: Path, data: Path, evals: Path, **changes) -> RunConfig:
    cfg = tiny_config(workdir, name="m")
    cfg["data"] = {"paths": [str(data)], "eval_paths": [str(evals)], "max_length": 256}
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 32}
    cfg["ray"] = {"enabled": False}
    # D0 in the fixed pool, so that the matrix sees every way a change reaches the pool (test_change_pool
    # switches to the default, exclude_warmup)
    cfg["select"] = {"pool": "all"}
    # keying is the point here, not the metrics: no generation (its budget is still part of the eval key)
    cfg["eval"] = {"max_new_tokens": 0}
    raw = RunConfig.model_validate(cfg).model_dump(mode="json")
    for dotted, value in changes.items():
        cur = raw
        *path, last = dotted.split(".")
        for k in path:
            cur = cur[k]
        cur[last] = value
    return RunConfig.model_validate(raw)


def _computing(cfg: RunConfig, flow) -> tuple:
    """``flow(cfg)``'s result, and the stages that computed something in that call."""
    since = None
    if cfg.db_path.exists():
        con = store.connect(cfg.db_path, read_only=True)
        since = store.last_stage_time(con)
        con.close()
    out = flow(cfg)
    con = store.connect(cfg.db_path, read_only=True)
    try:
        return out, store.stages_since(con, since) if since is not None else store.stages_of(con, [])
    finally:
        con.close()


def _run(cfg: RunConfig) -> list[dict]:
    """Run both flows; return the stages that computed something in this run."""
    from tokenclean.flows.cleaning import run

    return _computing(cfg, run)[1]


def _snapshot(cfg: RunConfig) -> dict:
    """Everything a run produced, by name and by content (uids, not database ids or keys)."""
    from safetensors.numpy import load_file

    from tokenclean.summary import label

    con = store.connect(cfg.db_path, read_only=True)
    try:
        dataset = next(o["key"] for o in store.current_outputs(con) if o["kind"] == "dataset")
        out: dict = {"keys": {}}
        for o in store.current_outputs(con):
            name, kind, key = label(o["variant"], o["iteration"]), o["kind"], o["key"]
            out["keys"][(name, kind)] = key
            if kind == "losses":
                out[(name, kind)] = losses_by_uid(con, key, dataset)
            elif kind == "selection":
                out[(name, kind)] = store.selection_digest(con, key)
            elif kind == "eval":
                out[(name, kind)] = store.eval_metrics(con, key)
            elif kind == "adapter":
                rec = store.adapter_record(con, key)
                out[(name, kind)] = load_file(str(cfg.run_dir / rec["path"] / "adapter_model.safetensors"))
        return out
    finally:
        con.close()


def _assert_same(got: dict, want: dict, *, stored_beyond_pool: bool = False) -> None:
    """``stored_beyond_pool``: the incremental run may hold more losses under a key than a fresh one (a pool
    that shrank leaves its old, still valid losses stored); they must agree on every loss the fresh run has."""
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        if k == "keys":
            # keys derived from inputs alone agree exactly (content-addressed samples, same configs)
            for name_kind in [("data", "dataset"), ("base", "model"), ("reference", "selection"),
                              ("full", "selection"), ("random", "selection")]:
                assert g.get(name_kind) == w.get(name_kind), name_kind
        elif k[1] == "losses":
            if stored_beyond_pool:
                wanted = {(u, p) for u, p, _ in w}
                g = [x for x in g if (x[0], x[1]) in wanted]
            assert [(u, p) for u, p, _ in g] == [(u, p) for u, p, _ in w], k
            np.testing.assert_allclose([x for _, _, x in g], [x for _, _, x in w], rtol=1e-4, atol=1e-4, err_msg=str(k))
        elif k[1] == "adapter":
            assert set(g) == set(w)
            for name in w:
                np.testing.assert_allclose(g[name], w[name], rtol=1e-3, atol=1e-5, err_msg=f"{k} {name}")
        elif k[1] == "eval":
            assert set(g) == set(w)
            for m in w:
                assert g[m] == pytest.approx(w[m], rel=1e-4, abs=1e-5), (k, m)
        else:
            assert g == w, k


def _steps(stages: list[dict]) -> dict:
    """{(stage, name): samples scored (score) or 1}: what a run computed."""
    out = {}
    for s in stages:
        n = s["detail"].get("samples_scored", 1) if s["stage"] == "score" else 1
        out[(s["stage"], s["name"])] = out.get((s["stage"], s["name"]), 0) + n
    return out


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """Input files, a second base model with the same tokenizer, and a finished base run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("keys")
    rows, evals = _rows(tiny.train)[:N_TRAIN], _rows(tiny.eval)[:N_EVAL]
    data, eval_path = root / "train.jsonl", root / "eval.jsonl"
    _write(data, rows)
    _write(eval_path, evals)
    other = root / "other-base"  # the same architecture and tokenizer, other weights
    model = AutoModelForCausalLM.from_pretrained(tiny.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny.model).save_pretrained(other)
    base_dir = root / "base"
    cfg = _config(base_dir, data, eval_path)
    _run(cfg)
    return {"root": root, "rows": rows, "data": data, "eval": eval_path, "other": other, "base_dir": base_dir,
            "snapshot": _snapshot(cfg)}


def _incremental_vs_fresh(world, name: str, changes: dict, edit=None, stored_beyond_pool: bool = False):
    """Copy the base run, apply the change, re-run it; run the final config fresh; compare."""
    root = world["root"] / name
    inc_dir, fresh_dir = root / "incremental", root / "fresh"
    shutil.copytree(world["base_dir"], inc_dir)
    data = world["data"]
    if edit is not None:  # the input file is edited in place, as a scheduled refresh sees it
        data = root / "train.jsonl"
        _write(data, edit([dict(r) for r in world["rows"]]))
    stages = _run(_config(inc_dir, data, world["eval"], **changes))
    fresh = _config(fresh_dir, data, world["eval"], **changes)
    _run(fresh)
    _assert_same(_snapshot(_config(inc_dir, data, world["eval"], **changes)), _snapshot(fresh),
                 stored_beyond_pool=stored_beyond_pool)
    return _steps(stages)


def _pool_size(world, parts, rows=None) -> int:
    return sum(_part(r["id"]) in parts for r in (rows or world["rows"]))


def _expect(score=(), select=(), train=(), evaluate=(), scores=(), ingest=False) -> dict:
    out = {("ingest", "dataset"): 1} if ingest else {}
    out |= {("score", n): c for n, c in score}
    out |= {("scores", n): 1 for n in scores}
    for stage, names in (("select", select), ("train", train), ("evaluate", evaluate)):
        out |= {(stage, n): 1 for n in names}
    return out


def test_rerun_unchanged_computes_nothing(world):
    stages = _run(_config(world["base_dir"], world["data"], world["eval"]))
    assert _steps(stages) == {}
    _assert_same(_snapshot(_config(world["base_dir"], world["data"], world["eval"])), world["snapshot"])


def _assert_losses_match_models(cfg: RunConfig) -> None:
    """Every stored loss equals what the model its key names (base, or base + the adapter on disk) computes now."""
    from tokenclean.tasks.score import ScoringModel, ShardSample

    con = store.connect(cfg.db_path, read_only=True)
    try:
        outputs = store.current_outputs(con)
        dataset = next(o["key"] for o in outputs if o["kind"] == "dataset")
        for model_key in {o["key"] for o in outputs if o["kind"] == "losses"}:
            scorer = store.model_inputs(con, model_key)  # losses key -> the model and how it was scored
            assert scorer["numerics"] == ["cpu", "float32"]  # this machine: CPU, fp32
            inputs = store.model_inputs(con, scorer["model"])
            adapter = None
            if inputs.get("adapter"):
                adapter = str(cfg.run_dir / store.adapter_record(con, inputs["adapter"])["path"])
                base_path = store.model_inputs(con, inputs["base_model"])["path"]
            else:
                base_path = inputs["path"]
            stored = losses_by_uid(con, model_key, dataset)
            ids = sorted({sid for sid, in con.execute(
                "SELECT DISTINCT sample_id FROM token_losses WHERE model = ?", [model_key]).fetchall()})
            samples = [ShardSample(*a) for a in sample_arrays(con, ids)]
            uid = dict(con.execute("SELECT sample_id, uid FROM samples WHERE sample_id IN (SELECT unnest(?))",
                                   [ids]).fetchall())
            now = ScoringModel(base_path).losses(samples, adapter=adapter, batch_tokens=4096, chunk=256)
            got = sorted(zip((uid[s] for s in now.column("sample_id").to_pylist()), now.column("pos").to_pylist(),
                             now.column("loss").to_pylist()))
            assert [(u, p) for u, p, _ in got] == [(u, p) for u, p, _ in stored]
            np.testing.assert_allclose([x for *_, x in got], [x for *_, x in stored], rtol=1e-4, atol=1e-4,
                                       err_msg=f"losses stored under {model_key} are not this model's")
    finally:
        con.close()


def test_change_k(world):
    steps = _incremental_vs_fresh(world, "k", {"select.k": 0.5})
    # the retrained theta_2's losses are the ones stored under its key (the bug this replaces reloaded old shards)
    _assert_losses_match_models(_config(world["root"] / "k" / "incremental", world["data"], world["eval"],
                                        **{"select.k": 0.5}))
    changed = ["random", "local", "global", *SE]  # full keeps every token whatever k is
    assert steps == _expect(score=[("self-evolving@1", _pool_size(world, {2}))], scores=["self-evolving@2"],
                            select=changed, train=changed, evaluate=changed)


def test_a_sweep_computes_only_the_k_it_adds(world, tmp_path):
    """k 0.6 -> [0.6, 0.4]: the k=0.6 variants are found by key under their sweep names; only k=0.4's selections,
    fine-tunes and evaluations run, and the only scoring is of its own theta_2 (the pool's scores are reused)."""
    # incremental only: re-run = fresh run is the matrix's (test_change_k); here the point is what is computed
    inc = world["root"] / "sweep" / "incremental"
    shutil.copytree(world["base_dir"], inc)
    steps = _steps(_run(_config(inc, world["data"], world["eval"], **{"select.k": [0.6, 0.4]})))
    new = ["random-k0.4", "local-k0.4", "global-k0.4", "self-evolving-k0.4@1", "self-evolving-k0.4@2"]
    assert steps == _expect(score=[("self-evolving-k0.4@1", _pool_size(world, {2}))],
                            scores=["self-evolving-k0.4@2"], select=new, train=new, evaluate=new)
    from tokenclean.summary import comparison, k_curve

    con = store.connect(world["root"] / "sweep" / "incremental" / "m" / "tokenclean.duckdb", read_only=True)
    try:
        curve = k_curve(comparison(con))
    finally:
        con.close()
    assert sorted({(r["k"], r["method"]) for r in curve}) == sorted(
        (k, m) for k in (0.4, 0.6) for m in ("full", "random", "local", "global", "self-evolving"))
    full = [r for r in curve if r["method"] == "full"]
    assert full[0] == full[1] | {"k": full[0]["k"]}  # full does not depend on k: the same row at every k
    from tokenclean.report import build_report

    html = build_report(world["root"] / "sweep" / "incremental" / "m", tmp_path / "r.html").read_text()
    assert html.count('<polyline class="curve"') == 2 * 5  # answers and loss against k, one line per variant
    assert "<h3>self-evolving-k0.4</h3>" in html and "<h3>self-evolving-k0.6</h3>" in html  # a trend per chain


def test_the_k_curve_pairs_each_variant_with_its_own_k():
    """Only the variants k does not decide recur at every k: a k-dependent row without a k (left current by an
    earlier run at one k) is no point of the curve."""
    from tokenclean.summary import CURVE_METRICS, k_curve

    def row(method, k, value):
        return {"method": method, "k": k} | dict.fromkeys(CURVE_METRICS, value)

    rows = [row("full", None, 1.0), row("weighted", None, 2.0), row("global", 0.3, 3.0), row("global", 0.5, 4.0),
            row("global", None, 5.0), row("self-evolving", None, 6.0), row("random", 0.5, 7.0)]
    got = {(r["k"], r["method"]): r["answer_match"] for r in k_curve(rows)}
    assert got == {(0.3, "full"): 1.0, (0.3, "weighted"): 2.0, (0.3, "global"): 3.0, (0.5, "full"): 1.0,
                   (0.5, "weighted"): 2.0, (0.5, "global"): 4.0, (0.5, "random"): 7.0}


def _contents(cfg: RunConfig) -> dict:
    """{variant: content key of its current selection}."""
    from tokenclean.summary import label

    con = store.connect(cfg.db_path, read_only=True)
    try:
        return {label(o["variant"], o["iteration"]): store.selection_content(con, o["key"])
                for o in store.current_outputs(con) if o["kind"] == "selection"}
    finally:
        con.close()


def test_a_reselection_that_keeps_the_same_tokens_retrains_nothing(world):
    """Early cutoff: adapters are keyed by the kept tokens. A k that keeps the same number of tokens changes the
    ranked selections' keys, not (for global) their content: every selection is recomputed, and exactly the variants
    whose kept tokens changed are retrained and re-evaluated (none for global)."""
    k = 0.6 + 1e-9
    before = _contents(_config(world["base_dir"], world["data"], world["eval"]))
    steps = _incremental_vs_fresh(world, "k-same-tokens", {"select.k": k})
    cfg = _config(world["root"] / "k-same-tokens" / "incremental", world["data"], world["eval"], **{"select.k": k})
    after = _contents(cfg)
    reselected = ["random", "local", "global", *SE]  # keys with k in them; full's and the reference's have none
    changed = sorted(n for n in reselected if after[n] != before[n])
    assert "global" not in changed  # round(k * N) tokens, the same top ones: the cutoff is exercised
    trained = sorted(n for stage, n in steps if stage == "train")
    # an iteration retrains when its own kept tokens or its parent (the iteration before) changed
    expect = sorted({n for n in changed} | {SE[i] for i in range(1, T) if SE[i - 1] in changed})
    assert trained == expect
    assert steps == _expect(select=reselected, train=expect, evaluate=expect,
                            score=[(SE[i - 1], _pool_size(world, {i + 1})) for i in range(1, T)
                                   if SE[i - 1] in expect],
                            scores=[SE[i] for i in range(1, T) if SE[i - 1] in expect])


def test_change_pool(world):
    """select.pool all -> exclude_warmup: only the fixed variants move; D1..D2 are scored already."""
    steps = _incremental_vs_fresh(world, "pool", {"select.pool": "exclude_warmup"}, stored_beyond_pool=True)
    fixed = ["full", "random", "local", "global"]
    assert steps == _expect(select=fixed, train=fixed, evaluate=fixed)


def test_change_lr(world):
    steps = _incremental_vs_fresh(world, "lr", {"train.lr": 1e-3})
    changed = [*FIXED, *SE]  # the reference has its own warmup_train
    assert steps == _expect(score=[("self-evolving@1", _pool_size(world, {2}))], scores=["self-evolving@2"],
                            select=["self-evolving@2"], train=changed, evaluate=changed)


def test_change_warmup_epochs(world):
    steps = _incremental_vs_fresh(world, "warmup", {"warmup_train.epochs": 2})
    # full and random do not depend on the reference: their selections, adapters and evals are reused
    ranked = ["local", "global", *SE]
    assert steps == _expect(score=[("reference", _pool_size(world, {0, 1, 2})),
                                   ("self-evolving@1", _pool_size(world, {2}))],
                            scores=["reference", "self-evolving@2"], select=ranked,
                            train=["reference", *ranked], evaluate=["reference", *ranked])


def test_change_base_model(world):
    steps = _incremental_vs_fresh(world, "base-model", {"model.base": str(world["other"]),
                                                        "model.tokenizer": str(world["other"])})
    n = _pool_size(world, {0, 1, 2})
    # selections that do not rank scores (D0 full, full, random) are the same token sets: reused
    assert steps == _expect(score=[("base", n), ("reference", n), ("self-evolving@1", _pool_size(world, {2}))],
                            scores=["reference", "self-evolving@2"], select=["local", "global", *SE],
                            train=ALL_SELECTIONS, evaluate=["base", *ALL_SELECTIONS])


def test_change_iterations(world):
    steps = _incremental_vs_fresh(world, "iterations", {"iterations": 3})
    se3 = [f"self-evolving@{t}" for t in (1, 2, 3)]
    d = lambda parts: sum(_part(r["id"], 4) in parts for r in world["rows"])  # noqa: E731
    # the same samples, split in four: base losses all reused; the pool of the fixed variants is the
    # same set of samples, so full and random are reused; D0 changed, so everything after theta_1 is new
    assert steps == _expect(ingest=True, score=[("reference", d({0, 1, 2, 3})), ("self-evolving@1", d({2})),
                                                ("self-evolving@2", d({3}))],
                            scores=["reference", "self-evolving@2", "self-evolving@3"],
                            select=["reference", "local", "global", *se3],
                            train=["reference", "local", "global", *se3],
                            evaluate=["reference", "local", "global", *se3])


def _edit_part(part: int, n: int = 3):
    def edit(rows):
        done = 0
        for r in rows:
            if _part(r["id"]) == part and done < n:
                r["response"] += " Hope this helps!"
                r.pop("answer", None)
                done += 1
        return rows
    return edit


def test_refresh_edits_d0(world):
    steps = _incremental_vs_fresh(world, "edit-d0", {}, edit=_edit_part(0))
    n = _pool_size(world, {0, 1, 2})
    assert steps == _expect(ingest=True, score=[("base", 3), ("reference", n),
                                                ("self-evolving@1", _pool_size(world, {2}))],
                            scores=["reference", "self-evolving@2"], select=ALL_SELECTIONS, train=ALL_SELECTIONS,
                            evaluate=ALL_SELECTIONS)


def test_refresh_edits_d2(world):
    steps = _incremental_vs_fresh(world, "edit-d2", {}, edit=_edit_part(2))
    changed = [*FIXED, "self-evolving@2"]  # theta_1 and theta_2 (trained on D0, D1) are kept
    assert steps == _expect(ingest=True, score=[("base", 3), ("reference", 3), ("self-evolving@1", 3)],
                            scores=["reference", "self-evolving@2"], select=changed, train=changed,
                            evaluate=changed)


def test_refresh_deletes_then_readds_rows(world):
    """Deleting rows of D1 recomputes what D1 reaches; adding them back brings back the first results by key."""
    root = world["root"] / "delete-readd"
    inc_dir = root / "incremental"
    shutil.copytree(world["base_dir"], inc_dir)
    data = root / "train.jsonl"
    removed = [r["id"] for r in world["rows"] if _part(r["id"]) == 1][:4]
    _write(data, [r for r in world["rows"] if r["id"] not in removed])
    steps = _steps(_run(_config(inc_dir, data, world["eval"])))
    changed = [*FIXED, *SE]  # D1 shrank: the fixed pool and iteration 1 changed, so theta_2 and on
    assert steps == _expect(ingest=True, score=[("self-evolving@1", _pool_size(world, {2}))],
                            scores=["self-evolving@2"], select=changed, train=changed, evaluate=changed)
    _write(data, world["rows"])  # the removed rows come back, unchanged
    steps = _steps(_run(_config(inc_dir, data, world["eval"])))
    assert steps == {}  # same content, same sample ids, same keys: everything is found, nothing recomputed
    _assert_same(_snapshot(_config(inc_dir, data, world["eval"])), world["snapshot"])


def test_scorer_key_resolves_auto_as_the_workers_will():
    """``device: auto`` is keyed by what scoring workers will use, not by the word 'auto'."""
    from tokenclean.flows.prepare import scorer_settings

    def settings(**ray):
        return scorer_settings(RunConfig.model_validate({"ray": ray}))["numerics"]

    assert settings(num_gpus_per_task=0) == ["cpu", "float32"]  # Ray hides GPUs from tasks that ask for none
    assert settings(num_gpus_per_task=1) == ["cuda", "bfloat16"]
    assert settings(enabled=False) == ["cpu", "float32"]  # in this (GPU-less) process
    explicit = scorer_settings(RunConfig.model_validate({"model": {"device": "cpu", "dtype": "bfloat16"},
                                                         "ray": {"num_gpus_per_task": 1}}))
    assert explicit["numerics"] == ["cpu", "bfloat16"]
    from tokenclean.tasks import keys

    a = RunConfig.model_validate({"score": {"compile": True}})
    assert keys.scorer_key("m", scorer_settings(a)) != keys.scorer_key("m", scorer_settings(RunConfig()))


def test_compile_auto_is_on_exactly_where_workers_score_on_cuda():
    """``score.compile: auto`` (the default) keys the losses by what the workers will run: compiled on CUDA only."""
    from tokenclean.flows.prepare import scorer_settings
    from tokenclean.tasks import keys

    def resolved(score=None, **ray):
        return scorer_settings(RunConfig.model_validate({"ray": ray, "score": score or {}}))

    assert resolved(num_gpus_per_task=1)["compile"] is True
    assert resolved(num_gpus_per_task=0)["compile"] is False
    assert resolved({"compile": False}, num_gpus_per_task=1)["compile"] is False
    assert resolved({"compile": True}, num_gpus_per_task=0)["compile"] is True
    # auto on CPU is the uncompiled key, so CPU runs keep the losses they stored before compile defaulted to auto
    assert keys.scorer_key("m", resolved()) == keys.scorer_key("m", resolved({"compile": False}))
    with pytest.raises(ValueError):
        RunConfig.model_validate({"score": {"compile": "sometimes"}})


def test_linear_ce_keys_the_losses_only_where_it_departs_from_the_plain_path():
    """``score.linear_ce: liger`` gets its own losses key; the default leaves every stored key as it was."""
    from tokenclean.flows.prepare import scorer_settings
    from tokenclean.tasks import keys

    def key(score=None):
        return keys.scorer_key("m", scorer_settings(RunConfig.model_validate(
            {"ray": {"num_gpus_per_task": 1}, "score": score or {}})))

    before = keys.scorer_key("m", {"numerics": ["cuda", "bfloat16"], "backend": "transformers", "compile": True})
    assert key() == key({"linear_ce": "chunked"}) == before
    assert key({"linear_ce": "liger"}) != before


def test_dropout_puts_the_layout_that_draws_its_masks_into_the_adapter_key():
    """LoRA dropout draws masks micro-batch by micro-batch on each worker: with it on, the micro-batch size and
    the number of workers change the adapter (measured: 20% of the weights' scale), so they key it; without
    it they only move rounding and do not (``test_training_cluster``: layouts agree at dropout 0)."""
    from tokenclean.config import TrainConfig

    on, off = {}, {"lora": {"dropout": 0.0}}
    assert TrainConfig(per_device_batch_size=8, **on).learning(1) != TrainConfig(per_device_batch_size=4, **on).learning(1)
    assert TrainConfig(**on).learning(1) != TrainConfig(**on).learning(2)
    assert TrainConfig(per_device_batch_size=8, **off).learning(1) == TrainConfig(per_device_batch_size=4, **off).learning(2)
    # a continued adapter trains with its parent's dropout, whatever train.lora says
    assert TrainConfig(**off).learning(1, dropout=0.1) != TrainConfig(**off).learning(2, dropout=0.1)
    assert TrainConfig(**on).learning(1, dropout=0.0) == TrainConfig(**on).learning(2, dropout=0.0)


# ---- refreshes that add data (issue: the warm-up set stays put) ------------------------------------------


def _pool_part(uid: str) -> int:
    """Where a row of data.paths goes when the warm-up set is its own input: D1..DT only."""
    return assign_part(uid, 0, 0.0, T + 1, False, warmup=False)


@pytest.fixture(scope="module")
def warm(tiny, tmp_path_factory):
    """The matrix's rows, D0 given as its own file (data.warmup_paths), and rows to append later."""
    root = tmp_path_factory.mktemp("warm")
    rows = _rows(tiny.train)[:N_TRAIN]
    _write(root / "eval.jsonl", _rows(tiny.eval)[:N_EVAL])
    warmup, pool = root / "warmup.jsonl", root / "pool.jsonl"
    _write(warmup, [r for r in rows if _part(r["id"]) == 0])
    _write(pool, [r for r in rows if _part(r["id"]) != 0])
    # rows to append later: new ids, new content
    added = [dict(r, id=f"added-{i}", response=r["response"] + " Indeed.") for i, r in enumerate(rows[:9])]
    return {"root": root, "warmup": warmup, "pool": pool, "added": added, "eval": root / "eval.jsonl"}


def _warm_config(workdir: Path, warm, pool: Path, **changes) -> RunConfig:
    """The paper's layout: the pool (D1..DT) apart from the warm-up file the reference is trained on."""
    cfg = _config(workdir, pool, warm["eval"], **({"select.pool": "exclude_warmup"} | changes))
    return RunConfig.model_validate(cfg.model_dump(mode="json") | {
        "data": cfg.data.model_dump(mode="json") | {"warmup_paths": [str(warm["warmup"])]}})


def _refresh(cfg: RunConfig) -> tuple[dict, dict]:
    """A refresh's result, and what it computed (``_steps``)."""
    from tokenclean.flows.cleaning import refresh

    out, stages = _computing(cfg, refresh)
    return out, _steps(stages)


def _appended(warm, name: str) -> Path:
    path = warm["root"] / name / "pool.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, _rows(warm["pool"]) + warm["added"])
    return path


def test_warmup_file_is_d0_and_the_pool_is_d1_to_dt(tiny, warm):
    """Rows of data.warmup_paths are all D0; rows of data.paths are drawn over D1..DT, never D0."""
    from transformers import AutoTokenizer

    from tests.ingest_helpers import ingest

    tok = AutoTokenizer.from_pretrained(tiny.model)
    pool_file = _appended(warm, "parts")
    assert any(_part(r["id"]) == 0 for r in warm["added"])  # rows that a drawn split would put in D0
    res = ingest([str(pool_file)], [], tok, max_length=256, eval_fraction=0.0, n_parts=T + 1, seed=0,
                 warmup_entries=[str(warm["warmup"])])
    parts = dict(zip(res.samples.column("uid").to_pylist(), res.samples.column("part").to_pylist()))
    warm_ids = {r["id"] for r in _rows(warm["warmup"])}
    assert warm_ids and {parts[u] for u in warm_ids} == {0}
    pool = {u: p for u, p in parts.items() if u not in warm_ids}
    assert set(pool.values()) == set(range(1, T + 1))
    assert all(p == _pool_part(u) for u, p in pool.items())


def test_refresh_appending_rows_scores_only_them_and_trains_nothing(warm):
    """With the warm-up set as its own file, a refresh after an append scores exactly the added rows, with the
    base and with the reference, retrains nothing, and ranks the pool as a fresh run does (the same theta_1)."""
    root = warm["root"] / "append-refresh"
    cfg = _warm_config(root / "incremental", warm, warm["pool"], mode="fixed")
    first, _ = _refresh(cfg)
    assert first["reference"]["retrained"] and first["samples"]["base"]["reused"] == 0
    pool = _appended(warm, "append-refresh-data")
    out, steps = _refresh(_warm_config(root / "incremental", warm, pool, mode="fixed"))
    n_added = len(warm["added"])
    assert out["refresh"]["added"] == n_added and out["refresh"]["changed"] == out["refresh"]["removed"] == 0
    assert out["samples"] == {"base": {"scored": n_added, "reused": first["samples"]["base"]["scored"]},
                              "reference": {"scored": n_added, "reused": first["samples"]["base"]["scored"]}}
    assert out["reference"]["retrained"] is False and out["reference"]["key"] == first["reference"]["key"]
    assert not any(stage == "train" for stage, _ in steps)
    assert steps == _expect(ingest=True, score=[("base", n_added), ("reference", n_added)], scores=["reference"],
                            select=["refresh"])
    fresh_cfg = _warm_config(root / "fresh", warm, pool, mode="fixed")
    fresh, _ = _refresh(fresh_cfg)
    assert fresh["reference"]["key"] == out["reference"]["key"]  # the same theta_1, trained from the same file
    inc, new = (_snapshot(c) for c in (_warm_config(root / "incremental", warm, pool, mode="fixed"), fresh_cfg))
    assert inc[("refresh", "selection")] == new[("refresh", "selection")]


def _edit_warmup(warm, name: str) -> Path:
    rows = _rows(warm["warmup"])
    rows[0] = dict(rows[0], response=rows[0]["response"] + " Hope this helps!")
    rows[0].pop("answer", None)
    path = warm["root"] / name / "warmup.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, rows)
    return path


@pytest.mark.parametrize("policy", ["keep", "retrain_if_changed"])
def test_editing_the_warmup_set_retrains_only_when_asked(warm, policy):
    """An edited warm-up row: ``keep`` reports it and keeps theta_1 (nothing trained, nothing rescored);
    ``retrain_if_changed`` retrains theta_1 and the reference rescores the whole pool."""
    root = warm["root"] / f"edit-warmup-{policy}"
    cfg = _warm_config(root, warm, warm["pool"], mode="fixed", **{"refresh.reference": policy})
    first, _ = _refresh(cfg)
    edited = dict(warm, warmup=_edit_warmup(warm, f"edit-warmup-{policy}-data"))
    out, steps = _refresh(_warm_config(root, edited, warm["pool"], mode="fixed", **{"refresh.reference": policy}))
    assert out["reference"]["warmup_changes"] == {"changed": 1}
    n_pool = first["samples"]["base"]["scored"]
    if policy == "keep":
        assert out["reference"]["retrained"] is False and out["reference"]["key"] == first["reference"]["key"]
        assert out["samples"]["reference"] == {"scored": 0, "reused": n_pool}
        assert steps == _expect(ingest=True)
    else:
        assert out["reference"]["retrained"] is True and out["reference"]["key"] != first["reference"]["key"]
        assert out["samples"]["reference"] == {"scored": n_pool, "reused": 0}
        assert steps == _expect(ingest=True, score=[("reference", n_pool)], scores=["reference"],
                                select=["reference", "refresh"], train=["reference"], evaluate=["reference"])
    assert out["samples"]["base"] == {"scored": 0, "reused": n_pool}  # the pool did not change


def test_self_evolving_after_an_append_recomputes_what_the_added_rows_reach(warm):
    """Algorithm 1 after an append, warm-up set as its own file: theta_1 and the base losses are reused; each added
    row is scored by the base once and joins one D_t, which re-selects D_t and retrains theta_(t+1) and every
    later iteration; the result equals a fresh run's."""
    root = warm["root"] / "append-self-evolving"
    base_dir = root / "incremental"
    _run(_warm_config(base_dir, warm, warm["pool"], mode="self_evolving"))
    pool = _appended(warm, "append-self-evolving-data")
    stages = _run(_warm_config(base_dir, warm, pool, mode="self_evolving"))
    fresh = _warm_config(root / "fresh", warm, pool, mode="self_evolving")
    _run(fresh)
    _assert_same(_snapshot(_warm_config(base_dir, warm, pool, mode="self_evolving")), _snapshot(fresh))
    reach = {_pool_part(r["id"]) for r in warm["added"]}
    first = min(reach)  # theta_(first+1) and every later one change
    d = lambda t: sum(_pool_part(r["id"]) == t for r in _rows(pool))  # noqa: E731
    added_in = lambda t: sum(_pool_part(r["id"]) == t for r in warm["added"])  # noqa: E731
    # iteration t scores D_t with theta_t (losses named after theta_t: reference, self-evolving@(t-1)): only the
    # added rows while theta_t is unchanged (t <= first), all of D_t after
    score = [("base", len(warm["added"]))] + [
        ("reference" if t == 1 else f"self-evolving@{t - 1}", added_in(t) if t <= first else d(t))
        for t in range(first, T + 1)]
    changed = [f"self-evolving@{t}" for t in range(first, T + 1)]
    assert _steps(stages) == _expect(ingest=True, score=score, scores=changed, select=changed, train=changed,
                                     evaluate=changed)
