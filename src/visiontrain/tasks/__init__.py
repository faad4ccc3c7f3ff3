"""Tasks: what the model predicts, its loss, metrics and summary."""

from visiontrain.tasks.base import Task, build_task, register_task

__all__ = ["Task", "build_task", "register_task"]
