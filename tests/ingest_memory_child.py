"""Run by ``test_ingest.py`` in its own process: ingest a file under an enforced RSS budget.

    python tests/ingest_memory_child.py MODEL DATA DB BUDGET_MB CHUNK_ROWS DUCKDB_LIMIT

A watchdog thread samples this process's RSS every 10 ms and kills it (exit 3) the moment it
has grown by more than BUDGET_MB since the tokenizer and database were opened (and the code
ingest runs was imported: a fixed cost, not the pool's). On success it
prints one JSON line: samples, tokens, growth_mb.
"""
import json
import os
import sys
import threading
import time

import psutil
import pyarrow.parquet  # noqa: F401  (code every run has imported: not part of what the pool costs)
from transformers import AutoTokenizer

from tokenclean.flows.ingest import stage_inputs
from tokenclean.tasks import storage, store  # noqa: F401
from tokenclean.tasks.ingest import IngestSpec, tokenization_of


def main() -> None:
    model, data, db, budget_mb, chunk_rows, limit = sys.argv[1:7]
    tok = AutoTokenizer.from_pretrained(model)
    con = store.connect(db, memory_limit=limit)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]

    def watch():
        while True:
            rss = proc.memory_info().rss
            peak[0] = max(peak[0], rss)
            if rss - base > float(budget_mb) * 2**20:
                print(json.dumps({"exceeded_mb": (rss - base) / 2**20}), flush=True)
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    spec = IngestSpec(tokenization_of(tok, 1024, "tulu"), 1024, 0.0, 2, 0, "tulu")
    n = stage_inputs(con, [data], [], tok, spec, parts_dir=f"{db}.parts", chunk_rows=int(chunk_rows))["rows_read"]
    summary = {"rows_read": n, **store.stage_summary(con)}
    store.insert_staged_dataset(con, "d", {}, summary)
    tokens = con.execute("SELECT sum(n_tokens) FROM samples").fetchone()[0]
    con.close()
    print(json.dumps({"samples": summary["samples"], "tokens": int(tokens), "growth_mb": (peak[0] - base) / 2**20}))


if __name__ == "__main__":
    main()
