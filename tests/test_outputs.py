"""What a run's names point to, on a real DuckDB file: lm-eval results follow the variant's current model,
and a base model rewritten in place is refused by export and lm-eval rather than merged under the old key."""
from __future__ import annotations

import time

import pytest

from tokenclean.tasks import keys, store


def _flow(con, name, outputs):
    run = store.start_flow_run(con, name, {}, "d")
    for variant, iteration, kind, key in outputs:
        store.record_output(con, run, variant, iteration, kind, key, True)
    store.finish_flow_run(con, run)
    time.sleep(0.01)  # flow runs are ordered by their start time
    return run


def test_lm_eval_results_are_listed_only_for_the_model_a_variant_has_now(tmp_path):
    con = store.connect(tmp_path / "run.duckdb")
    for adapter, model in (("t1", "m1"), ("t2", "m2")):
        store.record_adapter(con, adapter, model, f"adapters/{adapter}", {}, {}, {})
    store.record_eval(con, "e1", "m1", {}, [("acc", "lm-eval:facts", 0.9)])
    _flow(con, "fixed-model-cleaning", [("base", 0, "model", "b"), ("global", 0, "adapter", "t1")])
    _flow(con, "lm-eval:global", [("global", 0, "lm-eval", "e1")])

    def listed():
        return sorted((o["variant"], o["kind"], o["key"]) for o in store.current_outputs(con))

    assert ("global", "lm-eval", "e1") in listed()  # of m1, global's model
    _flow(con, "fixed-model-cleaning", [("base", 0, "model", "b"), ("global", 0, "adapter", "t2")])
    assert ("global", "lm-eval", "e1") not in listed()  # global is m2 now: e1 evaluated another model
    assert ("global", "adapter", "t2") in listed()
    con.close()


def test_a_base_model_rewritten_since_the_run_is_refused(tmp_path):
    from tokenclean.flows.export import verified_base

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights-1")
    con = store.connect(tmp_path / "run.duckdb")
    store.record_model(con, "B", "base", {"weights": keys.weights_hash(base), "path": str(base)})
    assert verified_base(con, "B") == (str(base), keys.weights_hash(base))
    (base / "model.safetensors").write_bytes(b"weights-2")
    with pytest.raises(ValueError, match="not the one this run used"):
        verified_base(con, "B")
    con.close()
