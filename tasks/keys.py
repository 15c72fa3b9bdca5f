"""What identifies every stored result: a key derived from the keys of its inputs.

A step is skipped iff its key is already stored complete, and nothing is looked up by name, so a changed setting
recomputes only what it reaches. Keys are SHA-256 of canonical JSON (never Python's or DuckDB's ``hash``), so they
agree across processes and versions. The chain of keys and what enters each: docs/design.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenclean.tasks.versions import SELECTION_RULES

KEY_CHARS = 20  # 80 bits of SHA-256: collisions are out of reach for any run's artifact count


def digest(*parts) -> str:
    """Stable key of JSON-serialisable parts (dict keys sorted, so field order never matters)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def is_key(value: str) -> bool:
    """A key is lowercase hex; the store inlines keys into SQL only after this check."""
    return isinstance(value, str) and 0 < len(value) <= 64 and all(c in "0123456789abcdef" for c in value)


def tokenization_key(tokenizer_fp: str, template: str, max_length: int) -> str:
    return digest("tokenization", tokenizer_fp, template, int(max_length))


def sample_id(tokenization: str, uid: str, content_hash: str) -> int:
    """A positive int64 naming one tokenised sample: the same content always gets the same id."""
    h = hashlib.sha256(json.dumps(["sample", tokenization, uid, content_hash]).encode()).digest()
    return int.from_bytes(h[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def dataset_key(tokenization: str, inputs: str, split: dict) -> str:
    return digest("dataset", tokenization, inputs, split)


def base_model_key(identity: dict) -> str:
    return digest("base-model", identity)


def adapter_model_key(base_model: str, adapter_hash: str) -> str:
    return digest("adapter-model", base_model, adapter_hash)


def scorer_key(model: str, settings: dict) -> str:
    return digest("scorer", model, settings)


def scores_key(base_model: str, ref_model: str) -> str:
    return digest("scores", base_model, ref_model)



# The selection methods that rank token scores, and those that keep every token (k does not enter their key).
SCORED_METHODS = ("global", "local", "sample", "weighted")
K_FREE_METHODS = ("full", "weighted")


def selection_key(method: str, k: float | None, seed: int, scores: str | None, pool: str) -> str:
    rule = [SELECTION_RULES[method]] if method in SELECTION_RULES else []  # other methods' keys are unchanged
    return digest("selection", method, *rule, None if method in K_FREE_METHODS else float(k),
                  seed if method == "random" else None, scores if method in SCORED_METHODS else None, pool)


def train_key(base_model: str, selection: str, train_config: dict, parent_model: str | None) -> str:
    return digest("adapter", base_model, selection, train_config, parent_model)


def eval_key(model: str, eval_set: str, eval_config: dict) -> str:
    return digest("eval", model, eval_set, eval_config)


# ---- content hashes of things on disk ----------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_META_FILES = ("config.json", "generation_config.json", "adapter_config.json")


def _hash_cache_path() -> Path:
    root = Path(os.environ.get("TOKENCLEAN_CACHE") or Path.home() / ".cache" / "tokenclean")
    return root / "file-hashes.json"


def file_sha256(path: Path, *, cache: bool = True) -> str:
    """SHA-256 of a file's bytes; with ``cache``, remembered by (real path, size, mtime, ctime, inode), since
    model weights are slow to hash. Data files pass ``cache=False``: a same-size edit within one clock tick must
    not go unseen. A hub snapshot's link into ``blobs/<sha256>`` is its own hash."""
    path = Path(path)
    if path.is_symlink():
        target = Path(os.readlink(path)).name
        if path.resolve().parent.name == "blobs" and len(target) == 64 and is_key(target):
            return target
    real = path.resolve()
    if not cache:
        return _sha256(real)
    st = real.stat()
    ident = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    cache_file = _hash_cache_path()
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if ident in known:
        return known[ident]
    value = known[ident] = _sha256(real)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_hash(directory: str | Path) -> str:
    """Content hash of a model or adapter directory: its weights and configs, by name and bytes."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): p for p in directory.rglob("*") if p.is_file()}
    return weights_hash_of(files, file_sha256, str(directory))


def weights_hash_of(files: dict, sha256, where: str) -> str:
    """``weights_hash`` over ``files`` (relative name -> anything ``sha256`` maps to the file's SHA-256): the same
    key for a local directory and for its copy in object storage, hashed from that copy's manifest."""
    names = sorted((n for n in files if not n.rsplit("/", 1)[-1].startswith(".")
                    and (Path(n).suffix in WEIGHT_SUFFIXES or Path(n).name in MODEL_META_FILES)),
                   key=lambda n: Path(n).parts)  # the order of Paths, as keys stored before were made
    if not any(Path(n).suffix in WEIGHT_SUFFIXES for n in names):
        raise FileNotFoundError(f"{where}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to identify the model by")
    return digest("files", [(n, sha256(files[n])) for n in names])


def resolve_model_dir(name_or_path: str) -> Path:
    """The directory holding a model's files: a local path, or the hub cache snapshot of a model id."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    from transformers.utils import cached_file

    config = cached_file(name_or_path, "config.json")
    if config is None:
        raise FileNotFoundError(f"model {name_or_path!r}: not a directory and not in the Hugging Face cache")
    return Path(config).parent


def inputs_fingerprint(entries: list[str]) -> str:
    """Content hash of data inputs: every file's bytes (a directory's top-level files), hub datasets by fingerprint,
    and the rules files are read by (``versions.READ_RULES``). Files count by name, not location (moving an
    unchanged input keeps its dataset); files ingest skips count by their bytes or by why they cannot be read."""
    from tokenclean.tasks.inputs import list_entry
    from tokenclean.tasks.versions import READ_RULES

    parts: list = [f"read-r{READ_RULES}"]
    for entry in entries:
        if entry == "--eval--":
            parts.append(entry)
            continue
        if entry.startswith("hf:"):
            name, _, split = entry[3:].partition(":")
            if Path(name).is_dir():  # save_to_disk directory: its files are its content
                files = sorted(p for p in Path(name).rglob("*") if p.is_file())
                parts.append([Path(name).name, split, [(str(f.relative_to(name)), file_sha256(f, cache=False))
                                                       for f in files]])
            else:  # a hub dataset: the datasets library's own content fingerprint of the loaded split
                import datasets

                parts.append([entry, datasets.load_dataset(name, split=split or "train")._fingerprint])
            continue
        p = Path(entry)
        # the files ingest lists (a directory's top-level entries), so the key moves with them only
        listed = [(Path(f), why) for f, why in list_entry(entry)] if p.exists() else []
        parts.append([(str(f.relative_to(p)) if p.is_dir() else f.name, _listed_content(f, why)) for f, why in listed])
    return digest("inputs", parts)


def _listed_content(path: Path, why: str | None) -> str:
    """A listed input file's bytes, or why it has none to read (a directory, a broken link, an I/O error)."""
    if why is None or path.is_file():
        try:
            return file_sha256(path, cache=False)
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
    return why
