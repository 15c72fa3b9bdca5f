"""Which environment variable names look like secrets: never given to workers (Ray logs a job's environment)."""
from __future__ import annotations

import re

# Words of a variable's name that say it holds a secret, by the usual conventions (AWS_SECRET_ACCESS_KEY, HF_TOKEN,
# DB_PASSWORD, OPENAI_API_KEY, ...): whole words, so TOKENCLEAN_CACHE is not one. A name that ends in _FILE, _PATH or
# _DIR says where a secret lives (AWS_SHARED_CREDENTIALS_FILE), which is no secret.
_SECRET_WORDS = {"SECRET", "SECRETS", "TOKEN", "TOKENS", "PASSWORD", "PASSWD", "PASSPHRASE", "PWD", "CREDENTIAL",
                 "CREDENTIALS", "PRIVATE", "AUTH", "APIKEY", "COOKIE"}
_SECRET_PAIRS = {("API", "KEY"), ("ACCESS", "KEY"), ("SESSION", "KEY"), ("SECRET", "KEY"), ("SIGNING", "KEY"),
                 ("ENCRYPTION", "KEY"), ("CLIENT", "SECRET")}


def is_secret_name(name: str) -> bool:
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    if words and words[-1] in ("FILE", "PATH", "DIR"):
        return False
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def secret_looking(names) -> list[str]:
    return [n for n in names if is_secret_name(n)]
