"""Old import paths: the modules that moved when jmllm-joint was regrouped by concept (0.2).

Importing a module by its pre-0.2 path imports the moved module itself (one object, so patches
and ``isinstance`` agree) and warns with a :class:`DeprecationWarning`, until 0.3. Paths that
became packages (``jmllm.joint.model``, ``.chat``, ``.audit``, ``.wsol``, ...) keep working
without a warning: each package re-exports what the module exported.

Example:
    >>> moved_to("jmllm.joint.explain_report")  # import it, and a DeprecationWarning says so
    'jmllm.joint.render.explanation'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

# old path -> new path; a name below an old path moves with it
MOVED_MODULES = {
    "jmllm.joint.tokenization": "jmllm.joint.chat.tokenization",
    "jmllm.joint.families": "jmllm.joint.model.families",
    "jmllm.joint.internals": "jmllm.joint.model.internals",
    "jmllm.joint.attribution": "jmllm.joint.saliency.attribution",
    "jmllm.joint.drawing": "jmllm.joint.render.drawing",
    "jmllm.joint.pages": "jmllm.joint.render.pages",
    "jmllm.joint.report": "jmllm.joint.render.report",
    "jmllm.joint.explain_report": "jmllm.joint.render.explanation",
    "jmllm.joint.wsol_page": "jmllm.joint.wsol.page",
    "jmllm.joint.audit_data": "jmllm.joint.audit.data",
    "jmllm.joint.audit_metrics": "jmllm.joint.audit.metrics",
    "jmllm.joint.audit_report": "jmllm.joint.audit.report",
    "jmllm.joint.chair": "jmllm.joint.audit.chair",
    "jmllm.joint.pope": "jmllm.joint.audit.pope",
    "jmllm.joint.benchmark_run": "jmllm.joint.audit.benchmark",
    "jmllm.joint.benchmark_report": "jmllm.joint.audit.benchmark_report",
    "jmllm.joint.sample_data": "jmllm.joint.toy.sample_data",
    "jmllm.joint.stats": "jmllm.joint.faithfulness.stats",
    "jmllm.joint.explorer": "jmllm.joint.app.explorer",
    "jmllm.joint.cli_app": "jmllm.joint.cli.app",
    "jmllm.joint.cli_explain": "jmllm.joint.cli.explain",
    "jmllm.joint.cli_audit": "jmllm.joint.cli.audit",
    "jmllm.joint.cli_benchmark": "jmllm.joint.cli.benchmark",
    "jmllm.joint.cli_faithfulness": "jmllm.joint.cli.faithfulness",
    "jmllm.joint.cli_sample": "jmllm.joint.cli.sample",
    "jmllm.joint.toy.cli": "jmllm.joint.cli.toy",
}
REMOVED_IN = "0.3"


def moved_to(name: str) -> str | None:
    """The new path of a module imported by its pre-0.2 path (``None`` when it did not move).

    Example:
        >>> moved_to("jmllm.joint.families.base")
        'jmllm.joint.model.families.base'
    """
    for old, new in MOVED_MODULES.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _MovedModule(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec):  # type: ignore[override]
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old path stops working in jmllm-joint "
            f"{REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,  # the importing line (warnings skips the import machinery's frames)
        )
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # the moved module ran when it was first imported
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # type: ignore[override]
        new = moved_to(name) if name.startswith("jmllm.joint.") else None
        return importlib.machinery.ModuleSpec(name, _MovedModule(new)) if new else None


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def forward_to(module: Any, package: str) -> Any:
    """A package's ``__getattr__`` that finds, in ``module``, what the package held when it was
    that one module (before 0.2): private helpers and the names it imported, beyond ``__all__``.

    Example:
        >>> from jmllm.joint import audit
        >>> audit._shared_prefix_length is audit.run._shared_prefix_length
        True
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
