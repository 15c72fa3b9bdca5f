"""Every numeric setting has a domain, checked when the config loads, before any work (issue 22).

The fields are enumerated from the models, so a numeric field added without a domain fails
here; each domain's boundaries are read from its constraints, and both sides are tried.
"""
from __future__ import annotations

import math
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from tests.conftest import tiny_config
from tokenclean.config import RunConfig, load_config


def _numeric_fields(model: type[BaseModel] = RunConfig, prefix: tuple[str, ...] = ()):
    """(path, int or float, its constraints) of every numeric field, nested sections included.

    A union with a constrained number (``select.k``: a fraction or a list of them) has its constraints on
    that member, not on the field."""
    for name, info in model.model_fields.items():
        args = typing.get_args(info.annotation) or (info.annotation,)
        sections = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        members = {typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a: a for a in args}
        if sections:
            yield from _numeric_fields(sections[0], prefix + (name,))
        elif bool not in members and (kind := next((a for a in members if a in (int, float)), None)):
            member = members[kind]
            extra = typing.get_args(member)[1:] if typing.get_origin(member) is typing.Annotated else ()
            constraints = [m for x in extra for m in getattr(x, "metadata", [x])]
            yield prefix + (name,), kind, _Constraints(info.metadata + constraints, info.default)


class _Constraints(typing.NamedTuple):
    metadata: list
    default: object


FIELDS = list(_numeric_fields())


def _bounds(info) -> tuple[tuple[float, bool] | None, tuple[float, bool] | None]:
    """(lower, upper), each (value, inclusive) or None."""
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, at.Ge):
            lo = (m.ge, True)
        elif isinstance(m, at.Gt):
            lo = (m.gt, False)
        elif isinstance(m, at.Le):
            hi = (m.le, True)
        elif isinstance(m, at.Lt):
            hi = (m.lt, False)
    return lo, hi


def _step(kind, x, direction: float):
    """The next representable value after ``x`` towards ``direction``."""
    return x + (1 if direction > 0 else -1) if kind is int else math.nextafter(x, direction)


def _outside(kind, info) -> list:
    lo, hi = _bounds(info)
    out = []
    if lo:
        out.append(_step(kind, lo[0], -math.inf) if lo[1] else lo[0])
    if hi:
        out.append(_step(kind, hi[0], math.inf) if hi[1] else hi[0])
    if kind is float:
        out += [math.nan, math.inf, -math.inf]
    return out


def _inside(kind, info) -> list:
    lo, hi = _bounds(info)
    out = []
    if lo:
        out.append(lo[0] if lo[1] else _step(kind, lo[0], math.inf))
    if hi:
        out.append(hi[0] if hi[1] else _step(kind, hi[0], -math.inf))
    return out


def _nested(path: tuple[str, ...], value) -> dict:
    out: dict = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


def test_every_numeric_field_has_a_domain():
    assert len(FIELDS) >= 40, [".".join(p) for p, _, _ in FIELDS]  # the enumeration reached every section
    # every setting is a count, a size, a rate, a fraction or a seed: none is meaningful below 0
    unbounded = [".".join(p) for p, _, info in FIELDS if _bounds(info)[0] is None]
    assert not unbounded, f"numeric fields without a lower bound: {unbounded}"


@pytest.mark.parametrize("path,kind,info", FIELDS, ids=[".".join(p) for p, _, _ in FIELDS])
def test_a_value_outside_the_domain_is_refused_naming_the_field(path, kind, info):
    for value in _outside(kind, info):
        with pytest.raises(ValidationError) as e:
            RunConfig.model_validate(_nested(path, value))
        assert [err["loc"] for err in e.value.errors()] == [path], (value, e.value)
    for value in _inside(kind, info) + ([None] if info.default is None else []):
        cfg = RunConfig.model_validate(_nested(path, value))
        section = cfg
        for key in path[:-1]:
            section = getattr(section, key)
        assert getattr(section, path[-1]) == value


# the issue's findings, as written on the command line
@pytest.mark.parametrize("override,field", [
    ("data.max_length=-5", "data.max_length"), ("train.lr=-1", "train.lr"), ("train.lr=.nan", "train.lr"),
    ("train.lora.r=0", "train.lora.r"), ("train.lora.dropout=1.5", "train.lora.dropout"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"), ("eval.max_samples=0", "eval.max_samples"),
    ("embedded.corrupt_fraction=2", "embedded.corrupt_fraction"), ("warmup_train.lr=.inf", "warmup_train.lr"),
    ("select.k=0", "select.k"), ("iterations=0", "iterations"), ("train.seed=-1", "train.seed"),
])
def test_issue_examples_are_refused(override, field):
    with pytest.raises(ValidationError) as e:
        load_config(None, [override])
    assert [".".join(map(str, err["loc"])) for err in e.value.errors()] == [field]


def test_shipped_and_test_configs_load(tmp_path):
    assert RunConfig() == load_config()
    load_config(Path(__file__).parents[1] / "tokenclean" / "configs" / "demo.yaml")
    RunConfig.model_validate(tiny_config(tmp_path))


@pytest.mark.parametrize("name", ["../../x", "a?b", ".", "..", "a/b", "", "a b", "x\n", "é", "C:x", "*"])
def test_run_names_that_leave_the_workdir_or_break_a_path_are_refused(name):
    with pytest.raises(ValidationError) as e:
        RunConfig(name=name)
    assert [err["loc"] for err in e.value.errors()] == [("name",)]


@pytest.mark.parametrize("name", ["default", "run-1.v2_x", "..a", "a..", "T"])
def test_run_names_in_the_alphabet_stay_inside_the_workdir(name, tmp_path):
    cfg = RunConfig(name=name, workdir=str(tmp_path))
    assert cfg.run_dir.resolve().parent == tmp_path.resolve()


def test_cli_run_refuses_a_bad_value_in_one_line_before_any_work(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "runs")))
    res = subprocess.run([sys.executable, "-m", "tokenclean.cli", "run", str(path), "--set", "train.lr=-1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config") and "train.lr" in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made
