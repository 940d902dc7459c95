"""The release archive is the same on every controller: packed by the role's own module, not by `tar`.

The module runs under ansible-playbook as the role runs it, once with GNU tar on PATH and once with only
bsdtar (a macOS controller), and over two copies of the checkout made with different umasks and dates; every
run must give the same checksum, the one the release id is made of. Both tars then read the archive back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "deploy" / "ansible" / "roles" / "app" / "library"
BIN = Path(sys.executable).parent
GNU_TAR = shutil.which("tar")
BSDTAR = shutil.which("bsdtar")


def _path_with(tmp_path: Path, tar: str | None) -> str:
    """A PATH of the venv and of every command in /usr/bin and /bin but `tar`, which is the given one."""
    tools = tmp_path / f"bin-{Path(tar).name if tar else 'none'}"
    if not tools.exists():
        tools.mkdir()
        for folder in (Path("/usr/bin"), Path("/bin")):
            for command in folder.iterdir():
                if command.name not in ("tar", "gtar") and not (tools / command.name).exists():
                    (tools / command.name).symlink_to(command)
        if tar:
            (tools / "tar").symlink_to(tar)
    return f"{BIN}:{tools}"


def _pack(tmp_path: Path, source: Path, dest: Path, path: str) -> dict:
    """Run the module through ansible-playbook on localhost; return its result."""
    playbook = tmp_path / "pack.yml"
    playbook.write_text(json.dumps([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [
            {"mlapi_archive": {"chdir": str(source), "paths": ["app", "requirements.txt"], "dest": str(dest)},
             "register": "packed"},
            {"ansible.builtin.copy": {"content": "{{ packed | to_json }}", "dest": str(dest) + ".json"}},
        ],
    }]))
    env = {"PATH": path, "HOME": str(tmp_path), "ANSIBLE_LIBRARY": str(LIBRARY), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0", "LANG": "C.UTF-8"}
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                             "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(Path(str(dest) + ".json").read_text())


def _checkout_copy(target: Path, umask: int, mtime: float) -> Path:
    """app/ and requirements.txt copied as a checkout under another umask and date would have them."""
    old = os.umask(umask)
    try:
        shutil.copytree(ROOT / "app", target / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(ROOT / "requirements.txt", target / "requirements.txt")
        for path in [target / "app", *target.rglob("*")]:
            if path.is_file():
                path.chmod(0o666 & ~umask)
            os.utime(path, (mtime, mtime))
        (target / "app" / "__pycache__").mkdir(exist_ok=True)
        (target / "app" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\x00compiled")
    finally:
        os.umask(old)
    return target


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    assert GNU_TAR and BSDTAR, "GNU tar and bsdtar are both needed: run scripts/setup-host.sh (libarchive-tools)"
    tmp = tmp_path_factory.mktemp("archive")
    first = _checkout_copy(tmp / "checkout-022", 0o022, 1_700_000_000)
    second = _checkout_copy(tmp / "checkout-002", 0o002, 1_800_000_000)
    runs = {
        "gnu": (first, _path_with(tmp, GNU_TAR)),
        "bsdtar": (first, _path_with(tmp, BSDTAR)),
        "no-tar": (second, _path_with(tmp, None)),
        "other-checkout-bsdtar": (second, _path_with(tmp, BSDTAR)),
    }
    results = {}
    for name, (source, path) in runs.items():
        dest = tmp / f"{name}.tar.gz"
        results[name] = (_pack(tmp, source, dest, path), dest)
    return results


def test_the_same_checksum_with_gnu_tar_bsdtar_or_no_tar_and_any_umask_or_date(packed):
    checksums = {name: result["sha256"] for name, (result, _) in packed.items()}
    assert len(set(checksums.values())) == 1, checksums
    files = {result["files"] for result, _ in packed.values()}
    assert files == {sum(1 for p in (ROOT / "app").rglob("*") if p.is_file() and "__pycache__" not in p.parts
                         and p.suffix != ".pyc") + 1}
    # Same machine, same zlib: the compressed bytes agree too.
    assert len({dest.read_bytes() for _, dest in packed.values()}) == 1


def test_entries_are_sorted_owned_by_root_dated_2000_and_without_bytecode(packed):
    _, dest = packed["bsdtar"]
    with tarfile.open(dest) as archive:
        members = archive.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names[0] == "app" and "requirements.txt" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 946684800)}
    assert {m.mode for m in members if m.isfile()} <= {0o644, 0o755}
    assert {m.mode for m in members if m.isdir()} == {0o755}


@pytest.mark.parametrize("tar", ["gnu", "bsdtar"])
def test_both_tars_read_it_back_to_the_checkout(packed, tmp_path: Path, tar: str):
    _, dest = packed["no-tar"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([GNU_TAR if tar == "gnu" else BSDTAR, "-xzf", str(dest), "-C", str(out)], check=True)
    for source in (ROOT / "app").rglob("*"):
        if source.is_file() and "__pycache__" not in source.parts and source.suffix != ".pyc":
            assert (out / source.relative_to(ROOT)).read_bytes() == source.read_bytes(), source
    assert (out / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()


def test_a_missing_path_is_a_clear_failure(tmp_path: Path):
    playbook = tmp_path / "pack.yml"
    playbook.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"mlapi_archive": {"chdir": str(tmp_path), "paths": ["app"], "dest": str(tmp_path / "x.tar.gz")}}]}]))
    env = {**os.environ, "ANSIBLE_LIBRARY": str(LIBRARY), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "0"}
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                             "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"app: no such file or folder under {tmp_path}" in result.stdout
    assert not (tmp_path / "x.tar.gz").exists()
    assert not list(tmp_path.glob(".mlapi-archive-*"))
