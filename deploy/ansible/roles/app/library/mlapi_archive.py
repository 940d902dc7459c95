#!/usr/bin/python
"""Ansible module: pack files into a reproducible .tar.gz on the controller, with Python's own tarfile.

The release archive names the release (its checksum is part of the release id), so the same files must give
the same archive on every controller. Packing with the `tar` on PATH cannot promise that: GNU tar's
`--sort`, `--mtime` and `--owner` are unknown to bsdtar (macOS, the BSDs), and each tar writes its own
headers. Here entries are sorted by path, owned by 0:0 with no names, dated 2000-01-01, with modes reduced to
0644 or 0755 (a checkout's umask does not leak in), in the POSIX pax format; gzip gets no name and no date.
The checksum returned is the one of the uncompressed tar stream: zlib builds may write different bytes for
the same input, the tar stream is the same everywhere.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: mlapi_archive
short_description: Pack files into a reproducible tar.gz
description:
  - Sorted entries, owner and group 0 without names, a fixed date, modes 0644/0755, no C(__pycache__).
  - Returns the sha256 of the uncompressed tar stream, the same on any controller for the same files.
options:
  chdir:
    description: Folder the paths are relative to.
    type: path
    required: true
  paths:
    description: Files or folders under I(chdir) to pack; C(.) for everything.
    type: list
    elements: str
    default: ["."]
  dest:
    description: The .tar.gz to write (replaced atomically).
    type: path
    required: true
  exclude:
    description: Glob patterns of file or folder names to leave out.
    type: list
    elements: str
    default: ["__pycache__", "*.pyc"]
"""

RETURN = r"""
sha256:
  description: sha256 of the uncompressed tar stream.
  type: str
  returned: success
files:
  description: Number of regular files packed.
  type: int
  returned: success
"""

import fnmatch
import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile

from ansible.module_utils.basic import AnsibleModule

MTIME = 946684800  # 2000-01-01T00:00:00Z
EXCLUDE = ["__pycache__", "*.pyc"]


class _HashingWriter(io.RawIOBase):
    """Writes through to the gzip stream and hashes the uncompressed bytes on the way."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.digest = hashlib.sha256()

    def writable(self):
        return True

    def write(self, data):
        self.digest.update(data)
        self.target.write(data)
        return len(data)


def _excluded(name, patterns):
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _entries(chdir, paths, exclude):
    """(name in the archive, path on disk) of every entry, sorted by name: parents come before children."""
    found = {}
    for top in paths:
        full = os.path.normpath(os.path.join(chdir, top))
        if not os.path.lexists(full):
            raise FileNotFoundError(f"{top}: no such file or folder under {chdir}")
        name = os.path.normpath(top)
        if name != ".":
            found[name] = full
        if os.path.isdir(full) and not os.path.islink(full):
            for root, dirs, files in os.walk(full):
                dirs[:] = [d for d in dirs if not _excluded(d, exclude)]
                for entry in dirs + [f for f in files if not _excluded(f, exclude)]:
                    path = os.path.join(root, entry)
                    found[os.path.normpath(os.path.join(name, os.path.relpath(path, full)))] = path
    return sorted(found.items())


def _normalised(info, path):
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = MTIME
    if info.issym():
        info.mode = 0o777
    elif info.isdir() or os.stat(path).st_mode & stat.S_IXUSR:
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


def pack(chdir, paths, dest, exclude=EXCLUDE):
    """Write dest; return (sha256 of the tar stream, number of files)."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), prefix=".mlapi-archive-")
    files = 0
    try:
        with os.fdopen(handle, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped:
            writer = _HashingWriter(zipped)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                for name, path in _entries(chdir, paths, exclude):
                    info = _normalised(archive.gettarinfo(path, arcname=name), path)
                    if info.isfile():
                        files += 1
                        with open(path, "rb") as content:
                            archive.addfile(info, content)
                    elif info.isdir() or info.issym():
                        archive.addfile(info)
                    else:
                        raise ValueError(f"{name}: not a file, folder or symlink; remove it from {chdir}")
        os.replace(temporary, dest)
    except BaseException:
        os.unlink(temporary)
        raise
    return writer.digest.hexdigest(), files


def main():
    module = AnsibleModule(
        argument_spec={
            "chdir": {"type": "path", "required": True},
            "paths": {"type": "list", "elements": "str", "default": ["."]},
            "dest": {"type": "path", "required": True},
            "exclude": {"type": "list", "elements": "str", "default": EXCLUDE},
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        sha256, files = pack(params["chdir"], params["paths"], params["dest"], params["exclude"])
    except (OSError, ValueError) as exc:
        module.fail_json(msg=f"cannot pack {params['paths']} of {params['chdir']}: {exc}")
    module.exit_json(changed=False, sha256=sha256, files=files)


if __name__ == "__main__":
    main()
