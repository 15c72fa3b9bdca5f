"""DuckDB: the one place a run's samples, token losses, selections and metrics live, by key.

All SQL of the project is in this package, as named functions; flows, tasks and the CLI
call them and write none. Every result is stored under the key of what produced it
(``tokenclean.tasks.keys``); see ``db`` for the schema and the rules.
"""
from tokenclean.tasks.store import report  # noqa: F401,E402  (store.report.*: the HTML report's aggregates)
from tokenclean.tasks.store.data import *  # noqa: F401,F403
from tokenclean.tasks.store.data import EVAL_PART  # noqa: F401
from tokenclean.tasks.store.db import (  # noqa: F401
    DB_FILE,
    DatabaseBusy,
    SchemaMismatch,
    connect,
    memory_limit,
    run_id,
    sql_key,
    sql_parts,
    transaction,
)
from tokenclean.tasks.store.losses import *  # noqa: F401,F403
from tokenclean.tasks.store.runs import *  # noqa: F401,F403
from tokenclean.tasks.store.selection import *  # noqa: F401,F403
from tokenclean.tasks.store.selection import METHODS  # noqa: F401
