"""Rendering templates and loading what they render.

Templates live in the ``tilec.templates`` package and hold all target syntax; Python passes them a small context.
``$TILEC_TEMPLATES`` names a directory laid out like the package whose templates are used in place of the package's
(the rest still come from the package): a variant of a kernel template, for an A/B run in one process or machine
start, without reinstalling tilec.
Rendered sources are written to a cache directory under a name made of their content hash, so identical kernels
(the same op at the same shapes in every layer) are one file, compiled once, and re-rendering is free.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jinja2

from tilec.errors import TilecError


def template_dirs() -> list[str]:
    """Where templates are looked up, first match first: ``$TILEC_TEMPLATES`` (if set), then the package."""
    import tilec.templates

    dirs = [str(Path(tilec.templates.__file__).parent)]
    override = os.environ.get("TILEC_TEMPLATES")
    if override:
        if not Path(override).is_dir():
            raise TilecError(f"TILEC_TEMPLATES={override!r} is not a directory; set it to a directory laid out like "
                             f"tilec's templates (e.g. one holding cuda/megakernel_tasks.cuh), or unset it")
        dirs.insert(0, override)
    return dirs


@lru_cache(maxsize=4)
def _environment(dirs: tuple[str, ...]) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(list(dirs)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["pyrepr"] = repr  # Python literals (True, None, 1e-05) in generated Python code
    return env


def environment() -> jinja2.Environment:
    return _environment(tuple(template_dirs()))


def render(template: str, **context) -> str:
    """Render ``template`` (a path under tilec/templates, e.g. ``triton/linear.py.j2``) with ``context``."""
    try:
        return environment().get_template(template).render(template=template, **context)
    except jinja2.TemplateError as exc:
        raise TilecError(f"rendering {template} failed: {type(exc).__name__}: {exc}") from exc


def cache_dir() -> Path:
    """Where rendered sources are written: ``$TILEC_CACHE_DIR`` or ``~/.cache/tilec`` (a temp dir if unwritable)."""
    base = os.environ.get("TILEC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tilec")
    path = Path(base) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "tilec-kernels"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def load_source(source: str, stem: str) -> ModuleType:
    """Write ``source`` to the cache (atomically, once per content) and import it as a module.

    Triton reads a kernel's source from its file, so generated kernels must live in real files.
    """
    name = f"tilec_gen_{stem}_{source_hash(source)}"
    if name in sys.modules:
        return sys.modules[name]
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a generated file that does not import is a tilec bug: name it
        del sys.modules[name]
        raise TilecError(f"generated module {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module
