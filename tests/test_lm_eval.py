"""lm-evaluation-harness hook on the tiny real model: local task, PEFT adapter, offline, DuckDB metrics."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY

from tokenclean.flows.lm_eval import facts_rows, record_lm_eval
from tokenclean.tasks.lm_eval import (
    FACTS_TASK,
    evaluate,
    run_lm_eval,
    write_facts_jsonl,
)

LIMIT = 18  # every (person, attribute) doc of the 6-person test world


@pytest.fixture(scope="module")
def facts(tiny, tmp_path_factory):
    """The facts task's data for the test session's world (not the demo world shipped with the task)."""
    rows = facts_rows(TINY["n_people"], TINY["seed"])
    return write_facts_jsonl(tmp_path_factory.mktemp("facts") / "facts.jsonl", rows)


@pytest.fixture(scope="module")
def adapter(tiny, tokenizer, tmp_path_factory):
    """A LoRA adapter trained on the test world's SFT data: it has learnt (some of) the facts."""
    from tests.ingest_helpers import ingest
    from tokenclean.tasks.train import TrainJob, TrainSample, train_worker, training_table

    res = ingest([str(tiny.train)], [], tokenizer, max_length=256, eval_fraction=0.0, n_parts=1, seed=0)
    samples = [TrainSample(np.array(r["input_ids"], dtype=np.int32), np.array(r["response_mask"]))
               for r in res.samples.to_pylist()]
    cfg = {"lr": 5e-3, "batch_size": 48, "per_device_batch_size": 16, "epochs": 3, "checkpoint_every": 0,
           "lora": {"r": 16, "alpha": 64, "dropout": 0.0}}
    out = tmp_path_factory.mktemp("lm_eval_adapter") / "theta"
    train_worker(TrainJob(str(tiny.model), cfg, training_table(samples), str(out), str(out) + ".ckpt", key="theta",
                          device="cpu", dtype="float32"))
    return out


@pytest.fixture(scope="module")
def runs(tiny, facts, adapter, tmp_path_factory):
    """lm-eval on the base and on base+adapter, from an unrelated cwd, with the loaded model types recorded."""
    import os

    from lm_eval.models.huggingface import HFLM

    seen = []
    init = HFLM.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        seen.append(type(self.model).__name__)

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative paths in task YAMLs must not depend on cwd
    HFLM.__init__ = spy
    try:
        kw = {"data_files": {FACTS_TASK: str(facts)}, "limit": LIMIT, "batch_size": 8, "log_samples": True}
        base = evaluate(str(tiny.model), None, [FACTS_TASK], **kw)
        tuned = evaluate(str(tiny.model), str(adapter), [FACTS_TASK], **kw)
    finally:
        HFLM.__init__ = init
        os.chdir(cwd)
    return {"base": base, "tuned": tuned, "models": seen}


def _lls(out) -> np.ndarray:
    docs = sorted(out["samples"][FACTS_TASK], key=lambda s: s["doc_id"])
    return np.array([float(r[0]) for s in docs for r in s["filtered_resps"]])


def _gold_margin(out) -> float:
    """Mean of (gold choice loglikelihood - best other choice's)."""
    margins = []
    for s in out["samples"][FACTS_TASK]:
        ll, gold = [float(r[0]) for r in s["filtered_resps"]], s["doc"]["gold"]
        margins.append(ll[gold] - max(v for i, v in enumerate(ll) if i != gold))
    return float(np.mean(margins))


def test_local_task_runs_on_base_and_adapter(runs, facts):
    base, tuned = runs["base"], runs["tuned"]
    assert runs["models"] == ["LlamaForCausalLM", "PeftModelForCausalLM"], runs["models"]
    assert tuned["config"]["model_args"]["peft"].endswith("theta")
    n_docs = len(facts.read_text().splitlines())
    for out in (base, tuned):
        samples = out["samples"][FACTS_TASK]
        assert len(samples) == min(LIMIT, n_docs)
        assert all(len(s["filtered_resps"]) == len(s["doc"]["choices"]) for s in samples)
        res = out["results"][FACTS_TASK]
        assert 0.0 <= res["acc,none"] <= 1.0
        # acc is the fraction of docs whose gold choice has the highest loglikelihood
        acc = np.mean([int(np.argmax([float(r[0]) for r in s["filtered_resps"]])) == s["doc"]["gold"]
                       for s in samples])
        assert res["acc,none"] == pytest.approx(acc)
    a, b = _lls(base), _lls(tuned)
    assert a.shape == b.shape and np.abs(a - b).max() > 1e-3, "the adapter did not change any loglikelihood"
    # the adapter was trained on this world's facts: it ranks the true value higher than the base does
    assert _gold_margin(tuned) > _gold_margin(base)


def test_loglikelihoods_match_a_direct_forward_pass(tiny, tokenizer, runs):
    """The task renders the Tulu prompt and scores ' <value>' exactly as our own forward pass does."""
    from transformers import AutoModelForCausalLM

    s = min(runs["base"]["samples"][FACTS_TASK], key=lambda s: s["doc_id"])
    doc = s["doc"]
    ctx = f"<|user|>\n{doc['question']}\n<|assistant|>\n{doc['prefix']}"
    assert [tuple(a) for a in s["arguments"]] == [(ctx, " " + c) for c in doc["choices"]]
    model = AutoModelForCausalLM.from_pretrained(tiny.model).eval()
    ctx_ids = tokenizer(ctx, add_special_tokens=False).input_ids
    for choice, resp in zip(doc["choices"][:3], s["filtered_resps"][:3]):
        full = tokenizer(ctx + " " + choice, add_special_tokens=False).input_ids
        assert full[:len(ctx_ids)] == ctx_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        want = sum(logp[p - 1, full[p]].item() for p in range(len(ctx_ids), len(full)))
        assert float(resp[0]) == pytest.approx(want, abs=1e-3)


def test_run_lm_eval_flattens_and_record_writes_duckdb(tiny, facts, tmp_path):
    from tokenclean.tasks.store import connect

    results = run_lm_eval(str(tiny.model), None, [FACTS_TASK], data_files={FACTS_TASK: str(facts)}, limit=6,
                          batch_size=4)
    assert set(results) == {FACTS_TASK}
    metrics = results[FACTS_TASK]
    assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics) and 0.0 <= metrics["acc"] <= 1.0
    con = connect(tmp_path / "run" / "tokenclean.duckdb")
    key = record_lm_eval(con, "b0", "base", [FACTS_TASK], 6, results)
    assert record_lm_eval(con, "b0", "base", [FACTS_TASK], 6, results) == key  # same inputs, same key
    assert record_lm_eval(con, "b0", "base", [FACTS_TASK], 7, results) != key  # another limit, another result
    rows = con.execute("SELECT metric, value FROM metrics WHERE eval = ? AND task = ?",
                       [key, f"lm-eval:{FACTS_TASK}"]).fetchall()
    con.close()
    assert len(rows) >= 3 and len(rows) == len({m for m, _ in rows})  # re-recording replaces, never duplicates
    assert dict(rows)["acc"] == pytest.approx(metrics["acc"])
    assert all(math.isfinite(v) for _, v in rows)


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        run_lm_eval(str(tiny.model), str(tmp_path), [FACTS_TASK])
    with pytest.raises(ValueError, match="unknown local task"):
        run_lm_eval(str(tiny.model), None, [FACTS_TASK], data_files={"nope": "x.jsonl"})


def test_shipped_task_data_is_the_demo_world():
    from tokenclean.config import EmbeddedConfig
    from tokenclean.tasks.lm_eval import TASKS_DIR

    e = EmbeddedConfig()
    shipped = [json.loads(line) for line in (TASKS_DIR / f"{FACTS_TASK}.jsonl").read_text().splitlines()]
    assert shipped == facts_rows(e.n_people, e.seed)


def test_run_lm_eval_for_run_uses_the_runs_world_and_records(tiny, adapter, runs, tmp_path):
    """What `tokenclean lm-eval RUN --adapter NAME` calls: base from the run DB, facts of the run's world."""
    import shutil

    import yaml

    from tokenclean.flows.lm_eval import run_lm_eval_for_run
    from tokenclean.summary import output_key
    from tokenclean.tasks import store

    run = tmp_path / "run"
    con = store.connect(run / "tokenclean.duckdb")
    shutil.copytree(adapter, run / "adapters" / "a1")
    # what a flow run leaves: the base model and the reference's adapter, by name -> key
    from tokenclean.tasks import keys

    store.record_model(con, "b0", "base", {"name": "embedded", "weights": keys.weights_hash(tiny.model),
                                           "path": str(tiny.model)})
    store.record_adapter(con, "a1", "c1", "adapters/a1", {}, {}, {})
    flow_run = store.start_flow_run(con, "fixed-model-cleaning", {}, "d0")
    store.record_output(con, flow_run, "base", 0, "model", "b0", False)
    store.record_output(con, flow_run, "reference", 0, "adapter", "a1", True)
    store.finish_flow_run(con, flow_run)  # readers see finished runs only
    con.close()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"base": "embedded"}, "embedded": dict(TINY)}))
    res = run_lm_eval_for_run(run, "reference", [FACTS_TASK], limit=LIMIT)
    # the same adapter on the same (regenerated) world gives exactly the adapter run's numbers
    assert res[FACTS_TASK]["acc"] == pytest.approx(runs["tuned"]["results"][FACTS_TASK]["acc,none"])
    assert res[FACTS_TASK]["acc_norm"] == pytest.approx(runs["tuned"]["results"][FACTS_TASK]["acc_norm,none"])
    con = store.connect(run / "tokenclean.duckdb", read_only=True)
    key = output_key(con, "reference", "lm-eval")  # listed beside (not instead of) the run's own evaluations
    rows = store.eval_metrics(con, key, f"lm-eval:{FACTS_TASK}")
    assert store.artifact_inputs(con, "eval", key)["model"] == "c1"  # keyed by the adapter's model key
    con.close()
    assert rows["acc"] == pytest.approx(res[FACTS_TASK]["acc"])
    # the same evaluation as a Ray task (what `--ray-address ... --gpus 1` does on a GPU cluster)
    import ray

    try:
        on_ray = run_lm_eval_for_run(run, "reference", [FACTS_TASK], limit=LIMIT, ray_address="local")
    finally:
        ray.shutdown()
    assert on_ray == res
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        run_lm_eval_for_run(run, "missing", [FACTS_TASK], limit=2)


def test_never_opens_a_network_connection(tiny, facts, monkeypatch):
    """Offline by default, even with the HF offline variables unset: any connect attempt fails the run."""
    import socket

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    attempts = []

    def refuse(self, address, *a, **kw):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return real(self, address, *a, **kw)

    real = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    res = run_lm_eval(str(tiny.model), None, [FACTS_TASK], data_files={FACTS_TASK: str(facts)}, limit=2)
    assert attempts == [] and 0.0 <= res[FACTS_TASK]["acc"] <= 1.0
