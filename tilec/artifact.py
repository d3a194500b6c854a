"""Writing and reading compile artifacts: a directory written whole or not at all.

Layout of an artifact directory:
  manifest.json        what was compiled, with which options and target, and the list of files
  report.md            the human-readable report; report.json holds the same figures
  stages/NN_name.txt   each stage's graph as a readable listing; stages/NN_name.py its FX Python code
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from tilec.errors import ArtifactError, TilecError

MANIFEST = "manifest.json"
FORMAT = "tilec-artifact/1"


def write_atomic(directory: str | Path, files: dict[str, str | bytes]) -> Path:
    """Write ``files`` (relative path -> content) as ``directory``, replacing an earlier tilec artifact there (see
    `staged_directory`). A non-empty directory that is not a tilec artifact is never replaced."""
    target = Path(directory).resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).exists())):
        raise ArtifactError(f"{target} exists and is not a tilec artifact; choose an empty or new directory")
    with staged_directory(target, ArtifactError) as tmp:
        for rel, content in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return target


@contextlib.contextmanager
def staged_directory(directory: str | Path, error: type[TilecError]) -> Iterator[Path]:
    """A directory written whole or not at all: the block fills an empty temporary sibling, which is renamed into
    place when the block ends (replacing what ``directory`` held; the caller decides whether that may be replaced).
    A reader never sees a half-written directory, and a failure leaves the old one untouched. An OSError becomes
    ``error`` naming the directory."""
    target = Path(directory).resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise error(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)  # put the previous contents back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an artifact directory; ArtifactError when it is not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a tilec artifact (no {MANIFEST}); make one with "
                            f"`tilec compile FILE.py -o {directory}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}; this tilec reads {FORMAT!r}")
    return manifest
