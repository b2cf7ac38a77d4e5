"""Undo what re-running a module's ``training_step`` during a curvature pass did to the module.

``HessianMonitor``'s default loss calls ``training_step`` again on the curvature batches, so whatever else
``training_step`` does happens again too: metric updates, counters, cached tensors, logger calls. The
:class:`TrainingStepGuard` snapshots, before the pass, the plain attributes of every submodule (everything
in its ``__dict__`` but parameters, buffers, child modules and hook tables) and afterwards puts back:

* attributes that were rebound (``self.count += 1``), added or deleted;
* tensors changed in place (their version counter moved; e.g. a torchmetrics ``Metric``'s states);
* lists, dicts and sets whose items changed (shallowly: the container's items, not objects inside them).

torchmetrics ``Metric`` states and counters are plain attributes, so they come back exactly; any other
change is restored and reported by name (:attr:`TrainingStepGuard.changed`). Loggers' ``log_metrics`` is
silenced during the pass. What lives outside the module (forward hooks' closures, global variables, files)
cannot be seen and is not restored: a ``loss_fn`` that computes only the loss avoids all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

_MISSING = object()
# nn.Module's own tables: parameters, buffers and children are the operators' business (never written to),
# hooks are registered and removed by the passes themselves; "training" is restored by curvature_context.
_SKIPPED = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "training",
    }
)
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None))


def _version(tensor: Tensor) -> int | None:
    """The tensor's in-place version counter; ``None`` for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _is_metric(module: nn.Module) -> bool:
    return any(cls.__module__.startswith("torchmetrics") for cls in type(module).__mro__)


class _Saved:
    """One attribute's value before the pass: the object, and a copy of its contents where it can change."""

    __slots__ = ("contents", "value", "version")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.version = _version(value) if isinstance(value, Tensor) else None
        if isinstance(value, Tensor):
            self.contents: Any = value.detach().clone()
        elif isinstance(value, list | dict | set):
            self.contents = value.copy()
        else:
            self.contents = None

    def changed(self, now: Any) -> bool:
        """Whether the attribute, now ``now``, differs from what was saved."""
        if now is not self.value:
            both_immutable = isinstance(now, _IMMUTABLE) and isinstance(self.value, _IMMUTABLE)
            return not (both_immutable and type(now) is type(self.value) and now == self.value)
        if isinstance(now, Tensor):
            if self.version is None:  # an inference tensor cannot change in place outside inference mode
                return False
            return _version(now) != self.version
        if isinstance(now, list):
            return len(now) != len(self.contents) or any(a is not b for a, b in zip(now, self.contents))
        if isinstance(now, dict):
            return now.keys() != self.contents.keys() or any(now[k] is not self.contents[k] for k in now)
        if isinstance(now, set):
            return now != self.contents
        return False

    def restore(self) -> Any:
        """The original object with its original contents."""
        value = self.value
        if isinstance(value, Tensor) and self.version is not None and _version(value) != self.version:
            with torch.no_grad():
                value.copy_(self.contents)
        elif isinstance(value, list):
            value[:] = self.contents
        elif isinstance(value, dict | set):
            value.clear()
            value.update(self.contents)
        return value


class TrainingStepGuard:
    """Context manager: restore the module's plain state after a pass, and record what had changed.

    Args:
        module: the module whose ``training_step`` the pass calls.
        loggers: loggers whose ``log_metrics`` is silenced inside the context (``training_step`` calling
            ``self.logger.log_metrics`` directly would otherwise write duplicate rows).

    Attributes:
        changed: after the context, the attributes (``"<submodule path>.<name>"``; torchmetrics states
            left out) that the pass had changed and that were put back.
    """

    def __init__(self, module: nn.Module, loggers: Sequence[Any] = ()) -> None:
        self.module = module
        self.loggers = list(loggers)
        self.changed: list[str] = []
        self._saved: list[tuple[str, nn.Module, dict[str, _Saved]]] = []
        self._logger_methods: list[tuple[Any, Any]] = []

    def __enter__(self) -> TrainingStepGuard:
        self.changed = []
        self._saved = [
            (path, m, {k: _Saved(v) for k, v in vars(m).items() if k not in _SKIPPED})
            for path, m in self.module.named_modules()
        ]
        for logger in self.loggers:
            self._logger_methods.append((logger, vars(logger).get("log_metrics", _MISSING)))
            logger.log_metrics = lambda *args, **kwargs: None
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, method in self._logger_methods:
            if method is _MISSING:
                del logger.log_metrics
            else:
                logger.log_metrics = method
        self._logger_methods = []
        for path, module, saved in self._saved:
            state = vars(module)
            names = [k for k in state if k not in _SKIPPED and k not in saved]  # added by the pass
            for name in names:
                del state[name]
            for name, before in saved.items():
                if before.changed(state.get(name, _MISSING)):
                    names.append(name)
                    state[name] = before.restore()
            if names and not _is_metric(module):
                self.changed.extend(f"{path}.{name}" if path else name for name in names)
        self._saved = []
