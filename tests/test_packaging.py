"""The wheel installs `tokenclean` only, and every source module of the repository is in it."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"tokenclean": "tokenclean", "flows": "tokenclean/flows", "tasks": "tokenclean/tasks",
           "infra": "tokenclean/infra"}  # repository folder -> where the wheel puts it


def test_wheel_holds_every_module_under_tokenclean_only(tmp_path):
    # Built from a clean copy of the work tree: setuptools reuses a build/ folder left in the
    # source tree, which could hold modules the package list no longer names.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("tokenclean-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tokenclean", next(t for t in tops if t.endswith(".dist-info"))}, tops  # no top-level `tasks`
    tracked = subprocess.run(["git", "ls-files", *FOLDERS], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    wanted = [f for f in tracked if f.endswith((".py", ".yaml", ".jsonl"))]
    assert wanted
    missing = []
    for f in wanted:
        top, _, rest = f.partition("/")
        if f"{FOLDERS[top]}/{rest}" not in names:
            missing.append(f)
    assert missing == [], f"not in the wheel: {missing}"
