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

from tokenclean.config import RunConfig
from tokenclean.tasks import store
from tokenclean.tasks.ingest import assign_part
from tests.conftest import tiny_config

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


def _run(cfg: RunConfig) -> list[dict]:
    """Run both flows; return the stages that computed something in this run."""
    from tokenclean.flows.cleaning import run

    since = None
    if cfg.db_path.exists():
        con = store.connect(cfg.db_path, read_only=True)
        since = store.last_stage_time(con)
        con.close()
    run(cfg)
    con = store.connect(cfg.db_path, read_only=True)
    try:
        return store.stages_since(con, since) if since is not None else store.stages_of(con, [])
    finally:
        con.close()


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
                out[(name, kind)] = store.losses_by_uid(con, key, dataset)
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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

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
            stored = store.losses_by_uid(con, model_key, dataset)
            ids = sorted({sid for sid, in con.execute(
                "SELECT DISTINCT sample_id FROM token_losses WHERE model = ?", [model_key]).fetchall()})
            samples = [ShardSample(*a) for a in store.sample_arrays(con, ids)]
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
