"""tilec: a compiler for low-latency decoding of MiMo-family Mixture-of-Experts models.

    import tilec
    cm = tilec.compile(model)                  # tilec's MiMo, a transformers MiMoV2FlashForCausalLM, or a directory
    logits = cm(input_ids)                     # [B, T, V]
    tokens = cm.generate(input_ids, max_new_tokens=32)
    print(cm.listing()); cm.save("out/")       # every stage, the report
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_MAPPED = ("passes", "runtime", "models", "templates")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Maps tilec.passes, .runtime, .models, .templates to the checkout's top-level folders, as setuptools'
    package-dir does for an install; used only when tilec is imported from a source checkout."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, name = fullname.partition(".")
        if pkg != "tilec" or name not in _MAPPED:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _map_source_tree() -> None:
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and importlib.util.find_spec("tilec.passes") is None:
        sys.meta_path.append(_SourceTreeFinder(root))


_map_source_tree()

from tilec.errors import TilecError  # noqa: E402,F401
from tilec import ops  # noqa: E402,F401  (registers torch.ops.tilec.*)
from tilec.options import Options  # noqa: E402,F401
from tilec.capture import capture  # noqa: E402,F401
from tilec.api import CompiledModel, compile  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["TilecError", "Options", "capture", "compile", "CompiledModel", "ops"]
