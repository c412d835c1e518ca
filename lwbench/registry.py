"""Name -> class registries for methods and tasks, with lazy built-ins and entry-point plugins.

Built-in methods and tasks are listed as ``"module:Class"`` strings and imported only when asked
for, so ``lwbench --help`` and ``lwbench list`` stay fast and a broken plugin cannot take the
whole tool down: it becomes one warning line. Third-party packages add names through the
entry-point groups ``lwbench.methods`` and ``lwbench.tasks``; the entry point may point at a class
(registered under the entry-point name) or at a module whose import runs ``@register_*``.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from lwbench.errors import UnknownNameError

T = TypeVar("T")

#: Plugin files imported by :meth:`Registry.load_module` in this process (resolved paths, in load order): the timing
#: worker (:mod:`lwbench.measure.worker`) loads them too, so it can unpickle a plugin's model classes.
_PLUGIN_FILES: list[str] = []


def plugin_files() -> list[str]:
    """The plugin files this process imported (``--plugin FILE.py``), resolved, in load order."""
    return list(_PLUGIN_FILES)


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str, builtins: dict[str, str]):
        self.kind = kind
        self.group = group
        self._builtins = dict(builtins)
        self._classes: dict[str, type] = {}
        self._origins: dict[str, str] = {}
        self._entry_points_loaded = False
        self.load_warnings: list[str] = []

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@register_method("tome")``. A second, different class under the
        same name is an error naming both origins (re-importing the same module is fine)."""

        def deco(cls: type[T]) -> type[T]:
            origin = _origin_of(cls)
            old = self._classes.get(name)
            if old is not None and old is not cls and self._origins.get(name) != origin:
                raise ValueError(
                    f"{self.kind} '{name}' is registered twice: {self._origins[name]} and {origin}"
                )
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            self._origins[name] = origin
            return cls

        return deco

    # -- lookup -------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break lwbench
                msg = f"lwbench: warning: {self.kind} plugin '{ep.name}' ({ep.value}) failed to import: {exc}"
                self.load_warnings.append(msg)
                warnings.warn(msg, stacklevel=2)
                continue
            if inspect.isclass(obj) and ep.name not in self._classes:
                self.register(ep.name)(obj)
                self._origins[ep.name] = f"entry point {ep.value}"

    def load_module(self, spec: str) -> None:
        """Import a plugin given as a module name or a path to a .py file (``--plugin``)."""
        from pathlib import Path

        path = Path(spec)
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise UnknownNameError(f"plugin file not found: {spec}")
            # One module per file (two plugins named myplug.py in different folders stay distinct), registered in
            # sys.modules so inspect finds its source (origins name the file) and pickling its classes works.
            resolved = path.resolve()
            mod_name = f"lwbench_plugin_{path.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
            if mod_name in sys.modules:
                return
            sp = importlib.util.spec_from_file_location(mod_name, resolved)
            mod = importlib.util.module_from_spec(sp)  # type: ignore[arg-type]
            sys.modules[mod_name] = mod
            try:
                sp.loader.exec_module(mod)  # type: ignore[union-attr]
            except BaseException:
                del sys.modules[mod_name]
                raise
            _PLUGIN_FILES.append(str(resolved))
        else:
            importlib.import_module(spec)

    def _import_builtin(self, name: str) -> None:
        target = self._builtins[name]
        module, _, attr = target.partition(":")
        importlib.import_module(module)
        if name not in self._classes:  # module did not self-register under that name
            self.register(name)(getattr(importlib.import_module(module), attr))

    def names(self, pattern: str = "*") -> list[str]:
        self._load_entry_points()
        return sorted(n for n in set(self._builtins) | set(self._classes) if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> type[T]:
        if name not in self._classes and name in self._builtins:
            self._import_builtin(name)
        if name not in self._classes:
            self._load_entry_points()
        if name not in self._classes:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} '{name}'.{hint} Known: {', '.join(known)}")
        return self._classes[name]

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origins[name]

    def __contains__(self, name: str) -> bool:
        return name in self.names()


def _origin_of(cls: type) -> str:
    try:
        return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]}"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


METHODS: Registry = Registry(
    "method",
    "lwbench.methods",
    {
        "full": "lwbench.methods.full:Full",
        "lookwhere": "lwbench.methods.lookwhere.method:LookWhere",
        "lowres": "lwbench.methods.lowres:LowRes",
        "apt": "lwbench.methods.apt:APT",
        "random": "lwbench.methods.random:RandomPatches",
        "grid": "lwbench.methods.grid:GridPatches",
        "saliency": "lwbench.methods.saliency:SaliencyPatches",
        "oracle": "lwbench.methods.oracle:Oracle",
        "dynamicvit": "lwbench.methods.dynamicvit:DynamicViT",
        "dps": "lwbench.methods.dps:DPS",
        "ips": "lwbench.methods.ips:IPS",
        "tome": "lwbench.methods.tome:ToMe",
        "pitome": "lwbench.methods.pitome:PiToMe",
        "token_transforming": "lwbench.methods.token_transforming:TokenTransforming",
        "mctf": "lwbench.methods.mctf:MCTF",
        "dtem": "lwbench.methods.dtem:DTEM",
        "algm": "lwbench.methods.algm:ALGM",
        "hourglass": "lwbench.methods.hourglass:Hourglass",
        "evit": "lwbench.methods.evit:EViT",
        "topk": "lwbench.methods.evit:TopK",
        "evit_random": "lwbench.methods.evit:EViTRandom",
        "topk_random": "lwbench.methods.evit:TopKRandom",
        "ats": "lwbench.methods.ats:ATS",
        "repshift": "lwbench.methods.repshift:RepShift",
        "saint": "lwbench.methods.saint:Saint",
    },
)
TASKS: Registry = Registry(
    "task",
    "lwbench.tasks",
    {
        "traffic_signs": "lwbench.tasks.traffic_signs:TrafficSigns",
        "billiards": "lwbench.tasks.billiards:Billiards",
        "imagenet": "lwbench.tasks.imagenet:ImageNet",
        "cub": "lwbench.tasks.cub:CUB",
        "ade20k": "lwbench.tasks.ade20k:ADE20K",
        "image_folder": "lwbench.tasks.image_folder:ImageFolderTask",
    },
)

register_method = METHODS.register
register_task = TASKS.register


def get_method(name: str):
    return METHODS.get(name)


def get_task(name: str):
    return TASKS.get(name)


def training_free_methods() -> list[str]:
    """Names of the registered methods that run off the shelf (``Method.training_free``), read from their classes so
    a new method or plugin is listed without anyone keeping a list; a plugin that fails to import is left out."""
    free = []
    for name in METHODS.names():
        try:
            cls = METHODS.get(name)
        except Exception:  # a broken plugin must not break a listing
            continue
        if cls.training_free:
            free.append(name)
    return free
