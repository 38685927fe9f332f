"""Finding task plugins: by class path, or by name through the ``ofa_lightning.tasks``
entry-point group (which this project's own tasks also use). No registry is filled at import."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ofa_lightning.task import Task

ENTRY_POINT_GROUP = "ofa_lightning.tasks"


def installed_tasks() -> dict[str, str]:
    """Task name -> class path, from every installed package's entry points."""
    return {ep.name: ep.value.replace(":", ".") for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_task_class(name_or_path: str) -> type[Task]:
    """``caption`` (an entry-point name) or ``tasks.caption.CaptionTask`` (a class path)."""
    known = installed_tasks()
    path = known.get(name_or_path, name_or_path)
    module_name, _, class_name = path.rpartition(".")
    choices = ", ".join(f"{n} ({p})" for n, p in sorted(known.items())) or "none installed"
    if not module_name:
        raise ValueError(f"unknown task {name_or_path!r}; give a class path like "
                         f"tasks.my_file.MyTask or one of: {choices}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"task {name_or_path!r}: module {module_name!r} cannot be imported "
                         f"({error}); known tasks: {choices}") from error
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        defined = sorted(n for n, v in vars(module).items()
                         if isinstance(v, type) and issubclass(v, Task) and v is not Task)
        raise ValueError(f"task {name_or_path!r}: module {module_name!r} has no Task subclass "
                         f"{class_name!r}; it defines {defined or 'no tasks'}; known tasks: {choices}")
    return cls
