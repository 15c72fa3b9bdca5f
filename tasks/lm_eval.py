"""lm-evaluation-harness on a worker: run lm-eval tasks on the base model or a fine-tuned adapter.

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
(16 people, seed 1234); ``write_facts_jsonl`` writes the docs of any other world (built from
plain values by ``fact_docs``), and ``flows.lm_eval`` does so for an embedded run automatically.
The run-level side (which model, recording the metrics) is ``flows/lm_eval.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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
def fact_docs(people: list[str], facts: dict[str, dict], values: dict[str, list[str]]) -> list[dict]:
    """One multiple-choice doc per (person, attribute of ``FACT_ATTRS``): the choices are ``values[attr]``,
    the gold one ``facts[person][attr]``."""
    rows = []
    for person in people:
        for attr, head in FACT_ATTRS.items():
            choices = list(values[attr])
            rows.append({"id": f"{person}/{attr}", "attr": attr, "question": FACT_QUESTIONS[attr].format(n=person),
                         "prefix": head.format(n=person), "choices": choices,
                         "gold": choices.index(facts[person][attr])})
    return rows


def write_facts_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
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


@dataclass(frozen=True)
class LmEvalJob:
    """One lm-eval run as the flow hands it to a worker: plain values only, so it travels to a Ray task.

    ``facts``: the ``tokenclean_facts`` docs of the run's world (None: the task's own data)."""

    base: str
    adapter_dir: str | None
    tasks: list[str]
    task_dirs: list[str] | None = None
    limit: int | None = None
    batch_size: int | str = 8
    device: str = "cpu"
    facts: list[dict] | None = None
    base_weights: str | None = None  # a base in object storage: its copy is checked against it
    base_key: str | None = None  # ... and an adapter's copy against its model key (keys.adapter_model_key)
    adapter_key: str | None = None


def run_job(job: LmEvalJob) -> tuple[dict, str]:
    """One lm-eval run where it executes (this process or a Ray worker): (results, task-sources key).

    The world's facts file is written here, so a remote worker needs no file from the driver's disk.
    """
    data_files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tokenclean-facts-") as tmp:
        if job.facts is not None:
            data_files[FACTS_TASK] = str(write_facts_jsonl(Path(tmp) / "facts.jsonl", job.facts))
        from tokenclean.tasks.storage import open_adapter, open_model

        # object storage: this node's copies, checked to be what the run recorded
        adapter = job.adapter_dir and open_adapter(job.adapter_dir, job.adapter_key, job.base_key)
        base = open_model(job.base, job.base_weights)
        results = run_lm_eval(base, adapter, job.tasks, task_dirs=job.task_dirs, limit=job.limit,
                              batch_size=job.batch_size, device=job.device, data_files=data_files or None)
        return results, task_sources_digest(job.tasks, job.task_dirs, data_files)
