"""The Token Cleaning paper's experiments, run on the embedded demo: the k curve and a reference trained elsewhere.

    python scripts/paper_experiments.py sweep --workdir /tmp/exp [--ks 0.3,0.5,0.7,0.9]
    python scripts/paper_experiments.py reference --workdir /tmp/exp [--clean-rows 1333]

``sweep`` runs the demo config with ``select.k`` as a list: every k's selections, fine-tunes and evaluations in
one run, the pool scored once. ``reference`` trains a reference elsewhere, RHO-1 style: the embedded base
fine-tuned (full tokens, the demo's warm-up training) on clean rows of the same synthetic world, written by this
script and never corrupted, then exported merged; the demo's fixed-model flow then runs twice, once with that
model as ``model.reference`` and once with theta_1 trained on the noisy D0. Each prints its tables and writes
them as JSON beside the runs. Results and their reading: docs/demo.md.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from importlib import resources
from pathlib import Path

from tokenclean.config import RunConfig, load_config


def demo_config(workdir: Path, name: str, *overrides: str) -> RunConfig:
    with resources.as_file(resources.files("tokenclean") / "configs" / "demo.yaml") as path:
        return load_config(path, [f"workdir={workdir}", f"name={name}", *overrides])


def run_and_read(cfg: RunConfig) -> dict:
    """Run the config's flows; return its comparison rows, its k curve and the wall time."""
    from tokenclean.flows.cleaning import run
    from tokenclean.summary import comparison, comparison_text, k_curve
    from tokenclean.tasks import store

    t0 = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - t0
    con = store.connect(cfg.db_path, read_only=True)
    try:
        rows = comparison(con)
        print(f"\n{cfg.name} ({seconds:.0f} s):\n{comparison_text(con)}")
    finally:
        con.close()
    return {"seconds": seconds, "rows": rows, "k_curve": k_curve(rows)}


def sweep(workdir: Path, ks: list[float]) -> dict:
    return run_and_read(demo_config(workdir, "k-sweep", f"select.k={json.dumps(ks)}"))


def write_clean_rows(cfg: RunConfig, path: Path, n: int, seed: int) -> Path:
    """``n`` rows of the demo's world with every fact true (none corrupted), ids of their own."""
    from tokenclean.synth import ATTRS, World, make_row

    world = World.make(cfg.embedded.n_people, cfg.embedded.seed)
    rng = random.Random(seed)
    kinds = list(ATTRS) + ["profile"] * len(ATTRS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            row = make_row(world, rng.choice(world.people), rng.choice(kinds), rng, corrupt=False,
                           boilerplate=rng.random() < 0.5, uid=f"clean-{i}")
            f.write(json.dumps(row) + "\n")
    return path


def train_reference_elsewhere(workdir: Path, n_rows: int) -> Path:
    """A merged model: the embedded base fine-tuned on clean rows, trained the way the demo trains theta_1."""
    from tokenclean.embedded import EmbeddedSpec, build
    from tokenclean.flows.export import export_run_model

    demo = demo_config(workdir, "unused")
    built = build(EmbeddedSpec.of(demo.embedded))
    clean = write_clean_rows(demo, workdir / "clean.jsonl", n_rows, seed=demo.embedded.seed + 7)
    warm = demo.reference_train.model_dump(mode="json")
    cfg = demo_config(workdir, "clean-reference", "mode=fixed", "baselines=[full]", "select.pool=all",
                      f"data.paths=[{clean}]", f"data.eval_paths=[{built.eval}]", f"train={json.dumps(warm)}")
    from tokenclean.flows.cleaning import run

    run(cfg)
    out = workdir / "clean-reference-model"
    if not (out / "config.json").exists():
        export_run_model(cfg.run_dir, "full", out)
    return out


def reference(workdir: Path, n_rows: int) -> dict:
    given = train_reference_elsewhere(workdir, n_rows)
    return {"reference_trained_elsewhere": str(given),
            # the theta_1 run's pool (D1..DT): with a given reference D0 would join it, and the two would differ
            "given": run_and_read(demo_config(workdir, "given-reference", "mode=fixed", f"model.reference={given}",
                                              "select.pool=exclude_warmup")),
            "theta1": run_and_read(demo_config(workdir, "warmup-reference", "mode=fixed"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=["sweep", "reference"])
    ap.add_argument("--workdir", type=Path, default=Path("runs/experiments"))
    ap.add_argument("--ks", default="0.3,0.5,0.7,0.9", help="sweep: the k values")
    ap.add_argument("--clean-rows", type=int, default=1333, help="reference: clean rows it is trained on")
    args = ap.parse_args()
    if args.experiment == "sweep":
        out = sweep(args.workdir, [float(k) for k in args.ks.split(",")])
    else:
        out = reference(args.workdir, args.clean_rows)
    path = args.workdir / f"{args.experiment}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
