"""What a run produced, by content, and the comparison of two runs with the suite's tolerances: losses by uid,
the kept tokens, adapter weights (from the run directory or object storage) and evaluation metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.store_reads import losses_by_uid
from tokenclean.tasks import storage, store


def snapshot(cfg, adapters=("reference", "global")) -> dict:
    """What a run produced, by content: losses by uid, kept (uid, pos), the weights and metrics of ``adapters``."""
    from safetensors.numpy import load_file

    from tokenclean.summary import output_key

    con = store.connect(cfg.db_path, read_only=True)
    try:
        dataset = output_key(con, "data", "dataset")
        out = {}
        for name in ("base", "reference"):
            out[f"losses/{name}"] = losses_by_uid(con, output_key(con, name, "losses"), dataset)
            check = store.check_integrity(con, output_key(con, name, "losses"), dataset, [1])
            assert check["ok"], check
        out["kept"] = sorted(con.execute(
            "SELECT s.uid, st.pos FROM selected_tokens st JOIN samples s USING (sample_id) WHERE st.selection = ?",
            [output_key(con, "global", "selection")]).fetchall())
        for name in adapters:
            rec = store.adapter_record(con, output_key(con, name, "adapter"))
            adapter = storage.open_dir(storage.under(cfg.run_dir, rec["path"]))  # a URL: this machine's copy
            out[f"adapter/{name}"] = load_file(str(Path(adapter) / "adapter_model.safetensors"))
            out[f"eval/{name}"] = store.eval_metrics(con, output_key(con, name, "eval"))
        out["placement"] = [json.loads(d) for (d,) in con.execute(
            "SELECT detail FROM stage_log WHERE stage IN ('score', 'train', 'evaluate')").fetchall()]
        out["ingest"] = [json.loads(d) for (d,) in con.execute(
            "SELECT detail FROM stage_log WHERE stage = 'ingest'").fetchall()]
        return out
    finally:
        con.close()


def assert_same(got: dict, want: dict) -> None:
    for k, w in want.items():
        g = got[k]
        if k.startswith("losses/"):
            assert [(u, p) for u, p, _ in g] == [(u, p) for u, p, _ in w], k
            np.testing.assert_allclose([x for *_, x in g], [x for *_, x in w], rtol=1e-4, atol=1e-4, err_msg=k)
        elif k.startswith("adapter/"):
            assert set(g) == set(w), k
            scale = max(float(np.abs(v).max()) for v in w.values())
            for name in w:
                np.testing.assert_allclose(g[name], w[name], rtol=0, atol=1e-5 * scale, err_msg=f"{k} {name}")
        elif k.startswith("eval/"):
            assert set(g) == set(w), k
            for m in w:
                assert g[m] == pytest.approx(w[m], rel=1e-4, abs=1e-5), (k, m)
        elif k == "kept":
            assert g == w


def nodes_of(details: list[dict]) -> set[str]:
    """The Ray nodes that the stage_log ``details`` (their ``placement``: one entry or a list) ran on."""
    out = set()
    for d in details:
        where = d.get("placement") or []
        out |= {p["node"] for p in (where if isinstance(where, list) else [where])}
    return out
