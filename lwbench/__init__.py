from lwbench.registry import METHODS, TASKS, register_method, register_task  # noqa: F401
