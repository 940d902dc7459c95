"""docs/architecture.md names the file of each step of the request and deploy paths: every path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTE = ROOT / "docs" / "architecture.md"
# Short forms the note uses inside a diagram, and the folder they stand for.
PREFIXES = {"roles/": "deploy/ansible/roles/", "snippets/": "deploy/nginx/snippets/"}
PATH = re.compile(r"(?<![\w/.@*-])((?:app|deploy|scripts|tests|docs|roles|snippets)/[\w./*<>@-]*)")
# A file named without its folder in the diagrams (predict.py, reload*.yml): some file of the tree has that name.
BARE = re.compile(r"(?<![\w/.@*-])([\w*@-]+\.(?:py|yml|j2))\b")


def _named_paths() -> list[str]:
    return sorted({m.group(1).rstrip(".,") for m in PATH.finditer(NOTE.read_text())})


def test_the_note_names_paths_at_all():
    assert len(_named_paths()) >= 30, _named_paths()


def test_every_path_the_note_names_exists():
    missing = []
    for named in _named_paths():
        if "<" in named:  # a placeholder: models/<name>/<version>/, inventories/<env>/
            named = named.split("<", 1)[0]
        for short, folder in PREFIXES.items():
            if named.startswith(short):
                named = folder + named.removeprefix(short)
        if not list(ROOT.glob(named.rstrip("/"))):
            missing.append(named)
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_file_named_without_its_folder_is_in_the_tree():
    bare = sorted({m.group(1) for m in BARE.finditer(NOTE.read_text())})
    assert len(bare) >= 10, bare
    searched = [ROOT / "app", ROOT / "deploy"]
    missing = [name for name in bare if not any(next(folder.rglob(name), None) for folder in searched)]
    assert missing == [], f"docs/architecture.md names files that are not under app/ or deploy/: {missing}"
