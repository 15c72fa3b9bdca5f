"""Resolve model and data, open the run database, ingest what is new.

Nothing here is refused for being different from last time: the inputs, tokenizer,
template, max length and split define a dataset key; a key already stored is reused
(ingest skipped), a new one is ingested, and samples whose content was seen before keep
their ids and therefore their losses. The base model is identified by its weights'
content hash; the numbers computed with it are keyed further by where and how they are
computed (``scorer`` for token losses, ``numerics`` for training and evaluation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenclean.config import RunConfig, dump_config
from tokenclean.flows.ingest import IngestJob, stage_inputs
from tokenclean.flows.runtime import run_logger
from tokenclean.tasks import keys, storage, store
from tokenclean.tasks.ingest import IngestSpec, tokenization_of
from tokenclean.tasks.storage import is_remote, join
from tokenclean.tasks.template import load_tokenizer, tokenizer_fingerprint


@dataclass
class RunContext:
    cfg: RunConfig
    con: object  # duckdb connection, owned by the flow process
    base_path: str
    tokenizer_path: str
    run_dir: Path
    dataset: str  # key of the ingested dataset this run works on
    base_model: str  # key of the base model's weights
    scorer: dict  # how scoring workers compute losses: resolved device type and dtype, backend, compile
    train_numerics: list  # [device type, dtype] the training workers resolve to
    eval_numerics: list  # ... and the evaluation tasks
    ingest: dict = field(default_factory=dict)  # what prepare did: ingested or reused, counts
    flow_run: str | None = None  # set by the flow; every output and stage is recorded under it
    storage: str = ""  # where workers write shard files (tasks/storage.py); the run directory by default
    reference: dict = field(default_factory=dict)  # which theta_1 this run uses, and why (warmup_reference)
    reference_path: str | None = None  # model.reference's directory, when one is given
    reference_model: str | None = None  # ... and its key (its name and weights, as the base's)
    tokenizer_fingerprint: str | None = None  # the tokenizer the samples were made with: later loads are checked

    @property
    def pool_parts(self) -> list[int]:
        """The fixed-model pool. By default D0 is left out: the reference was trained on it
        (``epochs`` passes), so its tokens score as easy and are over-kept; the official code
        keeps the warm-up file apart from the pool it cleans. A given ``model.reference`` was
        trained on none of it: D0 is then pool data like D1..DT (``select.pool: auto``)."""
        pool = self.cfg.select.pool
        if pool == "auto":
            pool = "exclude_warmup" if self.cfg.model.reference is None else "all"
        first = 1 if pool == "exclude_warmup" else 0
        return list(range(first, self.cfg.iterations + 1))

    def model_weights(self, key: str) -> str:
        """The weights hash recorded for the whole model ``key`` (the base, a given reference): what a worker's
        copy of it from object storage is checked against."""
        return store.model_inputs(self.con, key)["weights"]

    @property
    def remote(self) -> bool:
        """Workers share object storage, not a filesystem: adapters and checkpoints go there too."""
        return bool(self.storage) and is_remote(self.storage)

    def adapter_dir(self, key: str) -> str:
        return join(self.storage, "adapters", key) if self.remote else str(self.run_dir / "adapters" / key)

    def checkpoint_root(self, key: str) -> str:
        return join(self.storage, "checkpoints", key) if self.remote else str(self.run_dir / "checkpoints" / key)

    def checkpoint_dir(self, key: str, layout: str) -> str:
        return join(self.checkpoint_root(key), layout)

    def ray_train_dir(self) -> str:
        """Ray Train's own run state (``RunConfig.storage_path``) for a worker group."""
        return join(self.storage, "ray_train") if self.remote else str(self.run_dir / "ray_train")

    def training_set(self, train_key: str) -> str:
        """Where an adapter's training rows are streamed for its workers (beside the shards: workers reach it)."""
        return join(self.storage or str(self.run_dir), "training", f"{train_key}.parquet")

    def shard_dir(self, model_key: str) -> str:
        return join(self.storage or str(self.run_dir), "shards", model_key)


def resolve_inputs(cfg: RunConfig) -> tuple[str, list[str], list[str]]:
    """(base model path, data paths, eval paths); builds the embedded default when asked for."""
    paths, eval_paths = list(cfg.data.paths), list(cfg.data.eval_paths)
    if cfg.model.base == "embedded":
        from tokenclean.embedded import EmbeddedSpec, build

        built = build(EmbeddedSpec.of(cfg.embedded))
        if not paths:
            paths, eval_paths = [str(built.train)], eval_paths or [str(built.eval)]
        return str(built.model), paths, eval_paths
    if not paths:
        raise ValueError("data.paths is empty: give JSONL/Parquet files or hf:NAME "
                         "(only the embedded model has default data)")
    return cfg.model.base, paths, eval_paths


def base_model_identity(cfg: RunConfig, base_path: str) -> dict:
    """The base model: its weights' content hash (and the name it was given); in object storage, from its
    manifest (the driver downloads no weights)."""
    return {"name": cfg.model.base, "weights": storage.weights_hash(base_path)}


def reference_identity(cfg: RunConfig, tokenizer, tokenizer_path: str, base: dict) -> tuple[dict, str] | None:
    """``model.reference``'s identity (its name and weights hash, as the base's: ``base_model_identity``) and
    directory, once it is checked to read the run's token ids as the base does; None when none is given."""
    name = cfg.model.reference
    if name is None:
        return None
    try:
        directory = name if storage.is_remote(name) else str(Path(keys.resolve_model_dir(name)).resolve())
    except (OSError, ValueError) as e:  # a missing path, or a hub id that is not cached (or not an id)
        raise ValueError(f"model.reference {name}: not a model directory, nor a model in the Hugging Face cache "
                         f"({type(e).__name__})") from e
    check_reference_tokenizer(name, storage.open_tokenizer(directory), tokenizer, tokenizer_path)
    identity = {"name": name, "weights": storage.weights_hash(directory)}
    if identity["weights"] == base["weights"]:
        raise ValueError(f"model.reference {name}: its weights are the base model's ({base['name']}), so every "
                         "score would be 0; give another model, or leave it unset to train theta_1 on D0")
    return identity, directory


def check_reference_tokenizer(name: str, directory, tokenizer, tokenizer_path: str) -> None:
    """Refuse a reference that would read the run's token ids as other tokens, naming the first difference.

    What decides the ids is compared: the vocabulary (token -> id, added tokens included), the bos id every
    sample may start with, and that the model's embedding covers every id. A chat template may differ (an
    instruct model of the base), and so may eos and pad: an instruct model ends its turns with its own token
    (Llama-3.1-Instruct's <|eot_id|>, the base's <|end_of_text|>), and with one vocabulary the run's ids still
    name the same tokens; that difference is logged.
    """
    from transformers import AutoConfig, AutoTokenizer

    where, ours = f"model.reference {name}", f"the run's tokenizer ({tokenizer_path})"
    try:
        ref = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: no tokenizer loads from {directory} to compare with {ours} "
                         f"({type(e).__name__}); save the model's tokenizer beside it") from e
    vocab = tokenizer.get_vocab()
    diff = vocab_difference(ref.get_vocab(), vocab, ours)
    if diff is None and ref.bos_token_id != tokenizer.bos_token_id:
        diff = (f"its bos token is {ref.bos_token!r} ({ref.bos_token_id}), {ours} has {tokenizer.bos_token!r} "
                f"({tokenizer.bos_token_id})")
    if diff is not None:
        raise ValueError(f"{where}: {diff}; the reference must share the base's tokenizer")
    text = AutoConfig.from_pretrained(directory).get_text_config()
    size, needed = getattr(text, "vocab_size", None), max(vocab.values()) + 1
    if size is not None and size < needed:
        raise ValueError(f"{where}: its config's vocab_size {size} does not cover the {needed} token ids of {ours}")
    for role in ("eos", "pad"):
        if getattr(ref, f"{role}_token_id") != getattr(tokenizer, f"{role}_token_id"):
            run_logger().warning("%s: its %s token is %r, %s has %r; samples keep the run's (one vocabulary: the "
                                 "same token to both models)", where, role, getattr(ref, f"{role}_token"), ours,
                                 getattr(tokenizer, f"{role}_token"))


def vocab_difference(ref: dict[str, int], ours: dict[str, int], named: str) -> str | None:
    """The first token (by the run's ids, then the reference's) that the reference's vocabulary and the run's
    (``named``) map differently, as a phrase; None when they are one vocabulary."""
    if ref == ours:
        return None
    for token, i in sorted(ours.items(), key=lambda kv: kv[1]):
        j = ref.get(token)
        if j is None:
            return f"its tokenizer has no {token!r}, which {named} maps to {i}"
        if j != i:
            return f"its tokenizer maps {token!r} to {j}, {named} to {i}"
    token, j = min(((t, j) for t, j in ref.items() if t not in ours), key=lambda kv: kv[1])
    return f"its tokenizer maps {token!r} to {j}, a token {named} does not have"


def placed_numerics(cfg: RunConfig, gpus: float) -> list:
    """[device type, dtype] that Ray work asking for ``gpus`` GPUs resolves ``model.device``/``dtype`` to.

    On Ray, a task that asks for no GPU sees none (Ray sets CUDA_VISIBLE_DEVICES to
    empty), so ``device: auto`` means CPU there whatever the driver has, and CUDA when
    it asks for GPUs. Without Ray, the work runs in this process. Workers report what
    they actually used, and a mismatch with the key is an error, not a silent mix.
    """
    from tokenclean.tasks.score import numerics

    device = cfg.model.device
    if device == "auto" and cfg.ray.enabled:
        device = "cuda" if gpus > 0 else "cpu"
    return numerics(device, cfg.model.dtype)


def scorer_settings(cfg: RunConfig) -> dict:
    """How scoring workers will compute losses (``placed_numerics`` with the scoring task's GPUs).

    ``score.compile: auto`` resolves here, to on exactly when the workers score on CUDA, so
    the losses' key names what ran (the CPU default stays uncompiled: inductor's CPU code
    needs a C compiler and brings nothing to a memory-light tiny model).

    ``score.linear_ce`` enters the settings only when it is not ``chunked``, the path every
    loss was computed by before the setting existed: a setting added later departs from
    the old key only where it departs from the old computation, so stored losses stay
    found. A kernel the workers' device cannot run is refused here, before any work.
    """
    from tokenclean.tasks.score import check_linear_ce

    numerics = placed_numerics(cfg, cfg.ray.num_gpus_per_task)
    compile = cfg.score.compile if isinstance(cfg.score.compile, bool) else numerics[0] == "cuda"
    settings = {"numerics": numerics, "backend": cfg.score.backend, "compile": compile}
    if cfg.score.linear_ce != "chunked":
        check_linear_ce(cfg.score.linear_ce, numerics[0], load=False)
        settings["linear_ce"] = cfg.score.linear_ce
    return settings


def prepare(cfg: RunConfig, *, progress: bool = True) -> RunContext:
    """Open the run; ingest the inputs unless a dataset with the same key is already stored."""
    base_path, paths, eval_paths = resolve_inputs(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or base_path)
    identity = base_model_identity(cfg, base_path)
    # refused before the run directory is made: a reference that cannot read the run's ids costs nothing
    reference = reference_identity(cfg, tokenizer, cfg.model.tokenizer or base_path, identity)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    con = store.connect(cfg.db_path, memory_limit=cfg.db_memory_limit)
    try:
        job = ingest_job(cfg, con, tokenizer, base_path, paths, eval_paths, progress=progress)
        root = storage_root(cfg, con)
        info = _ingest_on_graph(con, job, tokenizer)
        base_model = keys.base_model_key(identity)
        store.record_model(con, base_model, "base", identity | {"path": base_path})
        ref_model = None if reference is None else keys.base_model_key(reference[0])
        if reference is not None:
            store.record_model(con, ref_model, "reference", reference[0] | {"path": reference[1]})
        dump_config(cfg, run_dir / "config.yaml")
        if store.samples_by_part(con, job.dataset).get(store.EVAL_PART, 0) == 0:
            raise ValueError("no held-out samples: set data.eval_paths or data.eval_fraction > 0")
    except BaseException:
        con.close()  # release the file lock for whoever runs next
        raise
    return RunContext(cfg=cfg, con=con, base_path=base_path, tokenizer_path=job.tokenizer, run_dir=run_dir,
                      dataset=job.dataset, base_model=base_model, scorer=scorer_settings(cfg),
                      train_numerics=placed_numerics(cfg, cfg.ray.gpus_per_train_worker),
                      eval_numerics=placed_numerics(cfg, cfg.ray.gpus_per_eval_task), ingest=info, storage=root,
                      reference_path=reference and reference[1], reference_model=ref_model,
                      tokenizer_fingerprint=job.tokenizer_fingerprint)


def ingest_job(cfg: RunConfig, con, tokenizer, base_path: str, paths: list[str], eval_paths: list[str], *,
               progress: bool = False) -> IngestJob:
    """The dataset the config's inputs make (its key: tokenization, the inputs' content, the split) and how
    to ingest it."""
    tokenization = tokenization_of(tokenizer, cfg.data.max_length, cfg.data.template, cfg.data.empty_think)
    split = {"parts": cfg.iterations + 1, "eval_fraction": 0.0 if eval_paths else cfg.data.eval_fraction,
             "seed": cfg.data.seed}
    warmup = list(cfg.data.warmup_paths)
    if warmup:  # only then, so the keys of runs without a warm-up input stay what they were
        split["warmup"] = True
    inputs = keys.inputs_fingerprint(paths + ["--eval--"] + eval_paths + (["--warmup--"] + warmup if warmup else []))
    dataset = keys.dataset_key(tokenization, inputs, split)
    spec = IngestSpec(tokenization, cfg.data.max_length, split["eval_fraction"], split["parts"], split["seed"],
                      cfg.data.template, warmup=bool(warmup), empty_think=cfg.data.empty_think)
    # each input split's processed part: in the workers' storage, copied to the run directory if remote
    return IngestJob(dataset=dataset, spec=spec, paths=tuple(paths), eval_paths=tuple(eval_paths),
                     warmup_paths=tuple(warmup), inputs=inputs, split=split,
                     tokenizer=cfg.model.tokenizer or base_path,
                     tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                     parts_dir=join(storage_root(cfg, con), "ingest", dataset),
                     local_dir=str(cfg.run_dir / "ingest" / dataset), workers=cfg.data.ingest_workers,
                     db_memory_limit=cfg.db_memory_limit, progress=progress)


def storage_root(cfg: RunConfig, con) -> str:
    """The run's own place for worker-written files: the run directory, or ``<storage>/<name>-<run id>``
    (a configured root may hold many runs; the id, kept in the database, keeps them apart)."""
    if cfg.storage is None:
        return str(cfg.run_dir)
    return join(cfg.storage, f"{cfg.name}-{store.run_id(con)}")


def _ingest_on_graph(con, job: IngestJob, tokenizer) -> dict:
    """In a flow run, ingest is a task run of it (``ingest/<dataset key>``, on the UI's graph, run in this
    process); outside one (``inspect``) a plain call, which needs no Prefect API."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return _ingest_once(con, job, tokenizer)
    ingest = task(_ingest_once, name="ingest", task_run_name=f"ingest/{job.dataset}", cache_policy=NO_CACHE)
    return ingest(con, job, tokenizer)


def _ingest_once(con, job: IngestJob, tokenizer) -> dict:
    """Ingest unless ``job.dataset`` is stored; say how it differs from the dataset the last run used.

    The diff (``changes``) is computed for this call, not stored: a dataset key seen before
    compares against whatever ran last now, not against what preceded its first ingest.
    """
    previous = store.latest_dataset(con) or store.last_ingested_dataset(con)
    info = _ingest_new(con, job, tokenizer)
    if previous is not None and previous != job.dataset:
        info["changes"] = store.dataset_diff(con, previous, job.dataset)
    return info


# DuckDB's memory while ingesting: staging only appends and streams, so a small cache is enough, and
# the flow process stays flat (benchmarks/ingest.py: peak RSS 641 MB at 50k rows, 767 MB at 200k with
# 256MB; 741 MB and 986 MB, then 2,457 MB at 1M, with run.db_memory_limit's 2GB)
INGEST_DB_MEMORY = "256MB"


def _ingest_new(con, job: IngestJob, tokenizer) -> dict:
    from tokenclean.tasks.storage import remove_tree

    summary = store.dataset_summary(con, job.dataset)
    if summary is not None:
        return {"ingested": False, **summary}
    t0 = time.perf_counter()
    # streamed: input splits are processed (by Ray workers reading the files themselves when
    # data.ingest_workers > 1) into Parquet parts under the run's storage, named by the dataset key
    # (an interrupted ingest resumes from its finished parts), and staged in the run database as
    # they complete; the driver holds no rows
    with store.memory_limit(con, INGEST_DB_MEMORY, after=job.db_memory_limit):
        read = stage_inputs(con, list(job.paths), list(job.eval_paths), tokenizer, job.spec, parts_dir=job.parts_dir,
                            local_dir=job.local_dir, chunk_rows=job.chunk_rows, workers=job.workers,
                            progress=job.progress, warmup_entries=list(job.warmup_paths))
        staged = store.stage_summary(con)
        if staged["samples"] == 0:
            q = store.staged_quarantine(con)
            store.stage_reset(con)
            for directory in (job.parts_dir, job.local_dir):
                remove_tree(directory)
            raise ValueError(f"no usable rows in {list(job.paths)}: all {read['rows_read']} rows were quarantined "
                             f"(first reason: {q[0]['reason'] if q else 'empty input'})")
        summary = {"rows_read": read["rows_read"], **staged}
        if read.get("reasoning_dropped"):  # reasoning the template does not render: counted, never silently lost
            summary["reasoning_dropped"] = read["reasoning_dropped"]
        if read["skipped"]:  # files not read (unreadable, another format): listed with the dataset, never silent
            summary["skipped_files"] = read["skipped"]
            run_logger().warning("ingest skipped %d file(s): %s", len(read["skipped"]),
                                 "; ".join(f"{f}: {why}" for f, why in read["skipped"].items()))
        counts = store.insert_staged_dataset(con, job.dataset, _described(job), summary)
    for directory in (job.parts_dir, job.local_dir):  # recorded in the database: the parts have served their purpose
        remove_tree(directory)
    return {"ingested": True, "seconds": time.perf_counter() - t0, **summary, **counts,
            "splits": read["splits"], "splits_reused": read["splits_reused"], "placement": read["placement"]}


def _described(job: IngestJob) -> dict:
    """What the dataset was ingested from, as its row records it (``store.dataset_inputs``)."""
    return {"paths": list(job.paths), "eval_paths": list(job.eval_paths), "warmup_paths": list(job.warmup_paths),
            "content": job.inputs, "tokenization": job.spec.tokenization, "tokenizer": job.tokenizer,
            "tokenizer_fingerprint": job.tokenizer_fingerprint,
            "template": job.spec.template, "max_length": job.spec.max_length, "split": job.split}
