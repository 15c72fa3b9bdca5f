"""lm-evaluation-harness hook: run lm-eval tasks on the base model or a fine-tuned adapter.

``run_lm_eval`` drives lm-eval's Python API (``lm_eval.simple_evaluate`` with the ``hf``
model, ``pretrained=<base>`` and ``peft=<adapter dir>``) over task YAMLs found in local
directories (``tasks/lm_eval_tasks/`` by default) and, only when a requested name is not
local, lm-eval's built-in tasks. It never touches the network unless asked to: the Hub
and datasets offline switches are on for the call (``offline=None`` follows
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` when set, and is offline otherwise).

Local task YAMLs may name their data with paths relative to the YAML file
(``dataset_kwargs.data_files``). ``datasets`` would resolve those against the caller's
working directory, so every task directory is copied into a temporary include dir
with those paths made absolute (and optionally replaced, see ``data_files``).

The bundled task ``tokenclean_facts`` is a multiple-choice probe of the synthetic world
(``tokenclean/synth.py``): "<|user|>\\nWhere does X live?\\n<|assistant|>\\nX lives in" and
the choices are the attribute's whole value list. Its shipped JSONL is the demo's world
(16 people, seed 1234); ``write_facts_jsonl`` writes it for any other world, and
``run_lm_eval_for_run`` does so for an embedded run automatically.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
FACTS_TASK = "tokenclean_facts"
FACT_ATTRS = {"city": "{n} lives in", "job": "{n} works as", "pet": "{n} has"}
FACT_QUESTIONS = {"city": "Where does {n} live?", "job": "What does {n} do for a living?",
                  "pet": "What pet does {n} have?"}
_TRUE = {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------- task data
def facts_rows(n_people: int, seed: int) -> list[dict]:
    """One multiple-choice doc per (person, attribute) of the synthetic world ``World.make(n_people, seed)``."""
    from tokenclean.synth import ATTRS, World

    world = World.make(n_people, seed)
    rows = []
    for person in world.people:
        for attr, head in FACT_ATTRS.items():
            choices = list(ATTRS[attr])
            rows.append({"id": f"{person}/{attr}", "attr": attr, "question": FACT_QUESTIONS[attr].format(n=person),
                         "prefix": head.format(n=person), "choices": choices,
                         "gold": choices.index(world.facts[person][attr])})
    return rows


def write_facts_jsonl(path: str | Path, n_people: int, seed: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in facts_rows(n_people, seed)))
    return path


# --------------------------------------------------------------------------- YAML staging
class _Tagged:
    """A YAML node with a custom tag (lm-eval's ``!function``), kept verbatim."""

    def __init__(self, tag: str, value: Any):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


def _construct_tagged(loader, tag_suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return _Tagged("!" + tag_suffix, value)


def _represent_tagged(dumper, data: _Tagged):
    if isinstance(data.value, list):
        return dumper.represent_sequence(data.tag, data.value)
    if isinstance(data.value, dict):
        return dumper.represent_mapping(data.tag, data.value)
    return dumper.represent_scalar(data.tag, data.value)


_Loader.add_multi_constructor("!", _construct_tagged)
_Dumper.add_representer(_Tagged, _represent_tagged)


def _absolute(files: Any, root: Path) -> Any:
    if isinstance(files, str):
        if "://" in files or files.startswith("hf:") or Path(files).is_absolute():
            return files
        return str((root / files).resolve())
    if isinstance(files, list):
        return [_absolute(f, root) for f in files]
    if isinstance(files, dict):
        return {k: _absolute(v, root) for k, v in files.items()}
    return files


def _stage_task_dirs(task_dirs: list[Path], dest: Path, data_files: dict[str, Any], cache_dir: Path) -> list[Path]:
    """Copy task dirs under ``dest`` with data_files made absolute (or overridden per task name)."""
    staged, seen = [], set()
    for i, src in enumerate(task_dirs):
        src = Path(src).resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"lm-eval task directory not found: {src}")
        out = dest / f"{i}_{src.name}"
        # data stays where it is (paths become absolute); YAMLs and their Python helpers are copied
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.jsonl", "*.json", "*.parquet",
                                                                "*.csv", "*.arrow"))
        for yml in sorted(list(out.rglob("*.yaml")) + list(out.rglob("*.yml"))):
            root = src / yml.parent.relative_to(out)
            cfg = yaml.load(yml.read_text(), Loader=_Loader)
            if not isinstance(cfg, dict):
                continue
            name = cfg.get("task")
            kwargs = cfg.get("dataset_kwargs")
            if isinstance(name, str) and name in data_files:
                seen.add(name)
                files = data_files[name]
                if isinstance(files, (str, os.PathLike)):
                    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
                    files = {split: str(files)}
                kwargs = cfg["dataset_kwargs"] = dict(kwargs or {})
                kwargs["data_files"] = _absolute(files, Path.cwd())
            elif isinstance(kwargs, dict) and "data_files" in kwargs:
                kwargs["data_files"] = _absolute(kwargs["data_files"], root)
            else:
                continue
            if cfg.get("dataset_path") in ("json", "csv", "parquet", "text", "arrow"):
                # a private datasets cache: no lock shared with other runs, nothing left behind
                kwargs.setdefault("cache_dir", str(cache_dir))
            yml.write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
        staged.append(out)
    if set(data_files) - seen:
        raise ValueError(f"data_files given for unknown local task(s): {sorted(set(data_files) - seen)}")
    return staged


# --------------------------------------------------------------------------- offline switch
@contextlib.contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Set the Hub/datasets offline switches, in the environment and in already-imported modules."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    patched: list[tuple[Any, str, Any]] = []
    for k in saved_env:
        os.environ[k] = "1"
    for mod_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                            ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue  # not imported yet: it reads the environment set above when it is
        for a in attrs:
            if hasattr(mod, a):
                patched.append((mod, a, getattr(mod, a)))
                setattr(mod, a, True)
    try:
        yield
    finally:
        for mod, a, v in patched:
            setattr(mod, a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _want_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if k in os.environ:
            return os.environ[k].upper() in _TRUE
    return True


# --------------------------------------------------------------------------- running
def _flatten(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``{task: {"acc,none": x, "alias": ...}}`` -> ``{task: {"acc": x}}`` (numbers only)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or key.startswith("sample_"):
                continue  # the alias, and lm-eval's sample counts (not metrics)
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        out[task] = row
    return out


def evaluate(base_path: str, adapter: str | None, tasks: list[str], *, task_dirs: list[str] | None = None,
             data_files: dict[str, Any] | None = None, limit: float | None = None, batch_size: int | str = 8,
             device: str = "cpu", dtype: str = "float32", num_fewshot: int | None = None, log_samples: bool = False,
             bootstrap_iters: int = 1000, offline: bool | None = None, seed: int = 0) -> dict:
    """Run lm-eval and return its full output (``results``, ``configs``, ``samples`` if logged, ...)."""
    if not tasks:
        raise ValueError("no lm-eval task given")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise FileNotFoundError(f"not a PEFT adapter directory (no adapter_config.json): {adapter}")
    dirs = [Path(d) for d in (task_dirs if task_dirs is not None else [TASKS_DIR])]
    with tempfile.TemporaryDirectory(prefix="tokenclean-lm-eval-") as tmp, _offline(_want_offline(offline)):
        tmp = Path(tmp)
        include = _stage_task_dirs(dirs, tmp / "tasks", dict(data_files or {}), tmp / "datasets")
        import lm_eval
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
        if any(t not in tm.all_tasks for t in tasks):  # a built-in task: index lm-eval's own YAMLs too
            tm = TaskManager(include_path=[str(p) for p in include], include_defaults=True)
            unknown = [t for t in tasks if t not in tm.all_tasks]
            if unknown:
                raise ValueError(f"unknown lm-eval task(s) {unknown}; local task dirs: {[str(d) for d in dirs]}")
        model_args: dict[str, Any] = {"pretrained": str(base_path), "dtype": dtype}
        if adapter is not None:
            model_args["peft"] = str(adapter)
        out = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=list(tasks), num_fewshot=num_fewshot, batch_size=batch_size,
            device=device, limit=limit, task_manager=tm, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    if out is None:  # only on non-zero ranks of a distributed run
        return {}
    return out


def run_lm_eval(base_path: str, adapter: str | None, tasks: list[str], *, task_dirs: list[str] | None = None,
                limit: int | None = None, batch_size: int | str = 8, device: str = "cpu",
                data_files: dict[str, Any] | None = None, **kwargs) -> dict[str, dict[str, float]]:
    """Evaluate ``base_path`` (+ the LoRA ``adapter`` dir, if given) on lm-eval ``tasks``.

    Returns ``{task: {metric: value}}``, e.g. ``{"tokenclean_facts": {"acc": 0.4, "acc_stderr": 0.1, ...}}``.
    ``data_files`` maps a local task name to the data file(s) to use instead of its YAML's.
    """
    out = evaluate(base_path, adapter, tasks, task_dirs=task_dirs, data_files=data_files, limit=limit,
                   batch_size=batch_size, device=device, **kwargs)
    return _flatten(out.get("results", {}))


def task_sources_digest(tasks: list[str], task_dirs: list[str] | None = None,
                        data_files: dict[str, Any] | None = None) -> str:
    """Key of what defines the tasks: their names, the bytes of the local task files and of substituted data."""
    from tokenclean.tasks import keys

    files = []
    for d in (task_dirs if task_dirs is not None else [TASKS_DIR]):
        files += [(f.name, keys.file_sha256(f, cache=False)) for f in sorted(Path(d).rglob("*")) if f.is_file()]
    data = {t: [keys.file_sha256(Path(f), cache=False) for f in ([v] if isinstance(v, (str, Path)) else v)]
            for t, v in sorted((data_files or {}).items())}
    return keys.digest("lm-eval-tasks", sorted(tasks), files, data)


def record_lm_eval(con, model_key: str, name: str, tasks: list[str], limit: int | None,
                   results: dict[str, dict[str, float]], settings: dict | None = None,
                   sources: str | None = None) -> str:
    """Store ``run_lm_eval`` results under their eval key; returns the key.

    The key covers the model, the task sources (``task_sources_digest``), the limit and the
    settings that change the numbers (device, dtype, batch size, few-shot). Recorded as the
    ``lm-eval`` output of an ``lm-eval:<name>`` flow run, so ``inspect`` and the dashboard
    list it beside (never instead of) the run's own evaluation of that model.
    """
    from tokenclean.tasks import keys, store

    key = keys.eval_key(model_key, sources or keys.digest("lm-eval-tasks", sorted(tasks)),
                        {"harness": "lm-eval", "limit": limit, **(settings or {})})
    rows = [(metric, f"lm-eval:{task}", float(value)) for task, metrics in results.items()
            for metric, value in metrics.items() if value is not None and math.isfinite(float(value))]
    store.record_eval(con, key, model_key, {"model": model_key, "tasks": sorted(tasks), "limit": limit}, rows)
    flow_run = store.start_flow_run(con, f"lm-eval:{name}", {"tasks": tasks, "limit": limit},
                                    store.latest_dataset(con))
    store.record_output(con, flow_run, name, 0, "lm-eval", key, True)
    store.finish_flow_run(con, flow_run)
    return key


def _lm_eval_job(base: str, adapter_dir: str | None, tasks: list[str], task_dirs, limit, batch_size, device: str,
                 facts: tuple[int, int] | None) -> tuple[dict, str]:
    """One lm-eval run where it executes (this process or a Ray worker): (results, task-sources key).

    The embedded world's facts file is regenerated here, so a remote worker needs no file
    from the driver's disk.
    """
    data_files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tokenclean-facts-") as tmp:
        if facts is not None:
            data_files[FACTS_TASK] = str(write_facts_jsonl(Path(tmp) / "facts.jsonl", *facts))
        results = run_lm_eval(base, adapter_dir, tasks, task_dirs=task_dirs, limit=limit, batch_size=batch_size,
                              device=device, data_files=data_files or None)
        return results, task_sources_digest(tasks, task_dirs, data_files)


def run_lm_eval_for_run(run_dir: str | Path, adapter: str | None, tasks: list[str], *, limit: int | None = None,
                        batch_size: int | str = 8, device: str = "cpu", task_dirs: list[str] | None = None,
                        ray_address: str | None = None, gpus: float = 0.0) -> dict[str, dict[str, float]]:
    """lm-eval on a run's base model or one of its variants' adapters (``global``, ``self-evolving@2``); records metrics.

    The adapter is found through the latest run's outputs by the variant's name, and the
    results are stored under the key of the exact model evaluated.
    For a run on the embedded default the ``tokenclean_facts`` data is regenerated for that run's world.
    With ``ray_address`` the harness runs as a Ray task asking for ``gpus`` GPUs (the model
    and adapter paths must be visible on that node); otherwise in this process.
    """
    from tokenclean.tasks import store
    from tokenclean.summary import output_key

    run_dir = Path(run_dir)
    db = run_dir / store.DB_FILE
    if not db.exists():
        raise FileNotFoundError(f"no tokenclean database at {db}")
    con = store.connect(db, read_only=True)
    try:
        base_key = output_key(con, "base", "model")
        if base_key is None:
            raise ValueError(f"{db} has no finished flow run: run the pipeline first")
        from tokenclean.tasks.export import verified_base

        base = verified_base(con, base_key)
        model_key, adapter_dir = base_key, None
        if adapter:
            train_key = output_key(con, adapter, "adapter")
            if train_key is None:
                raise ValueError(f"no adapter named {adapter!r} in the latest runs of {run_dir} "
                                 "(names: reference, full, random, local, global, self-evolving@T)")
            rec = store.adapter_record(con, train_key)
            model_key, adapter_dir = rec["model"], str(run_dir / rec["path"])
    finally:
        con.close()
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    facts = None
    if FACTS_TASK in tasks and (cfg.get("model") or {}).get("base") == "embedded":
        from tokenclean.config import EmbeddedConfig

        e = EmbeddedConfig.model_validate(cfg.get("embedded") or {})
        facts = (e.n_people, e.seed)
    args = (str(base), adapter_dir, tasks, task_dirs, limit, batch_size, device, facts)
    if ray_address is None:
        results, sources = _lm_eval_job(*args)
    else:
        import ray

        from tokenclean.tasks.cluster import connected

        with connected(ray_address):
            job = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(_lm_eval_job)
            results, sources = ray.get(job.remote(*args))
    con = store.connect(db, wait_s=30)
    try:
        record_lm_eval(con, model_key, adapter or "base", tasks, limit, results,
                       {"device": device, "dtype": "float32", "batch_size": batch_size}, sources)
    finally:
        con.close()
    return results
