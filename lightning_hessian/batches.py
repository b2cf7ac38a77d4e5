r"""Batches as ``analyze`` and the operators see them: one or several, their tensors found, moved and split.

A batch is whatever ``loss_fn(model, batch)`` takes. Its tensors are found inside tuples, lists, dicts, other
``Mapping``\ s (``UserDict``, Hugging Face's ``BatchEncoding``) and dataclasses, recursively: those are moved
to the parameters' device, floating ones cast to the compute dtype, and split along their first dimension
for ``chunk_size``. Other objects are passed to ``loss_fn`` unchanged. The user's batch is never modified:
the containers are rebuilt.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["Batches", "as_batches", "batch_size", "find_tensors", "map_tensors", "move_batch", "split_batch"]


class Batches(tuple):
    """Marks a sequence of batches, so that ``analyze(model, loss_fn, Batches([b1, b2]))`` uses all of them.

    A plain tuple or list is taken as *one* batch (``(inputs, targets)`` is a tuple too). A
    :class:`~torch.utils.data.DataLoader` or any iterator is taken as several batches without marking.
    """

    __slots__ = ()


def as_batches(data: Any) -> list[Any]:
    """Return the list of batches that ``data`` stands for (see :class:`Batches`)."""
    if isinstance(data, Batches | DataLoader | collections.abc.Iterator):
        batches = list(data)
        if not batches:
            raise ValueError("data holds no batches: pass at least one batch.")
        return batches
    return [data]


def _is_dataclass_instance(data: Any) -> bool:
    return dataclasses.is_dataclass(data) and not isinstance(data, type)


def find_tensors(data: Any) -> Iterator[Tensor]:
    r"""The tensors of a batch, in order: inside tuples, lists, ``Mapping``\ s and dataclasses, recursively.

    Tensors held by other objects are not found (and so are neither moved, cast nor split).
    """
    if isinstance(data, Tensor):
        yield data
    elif isinstance(data, collections.abc.Mapping):
        for value in data.values():
            yield from find_tensors(value)
    elif _is_dataclass_instance(data):
        for field in dataclasses.fields(data):
            yield from find_tensors(getattr(data, field.name))
    elif isinstance(data, list | tuple):
        for value in data:
            yield from find_tensors(value)


def map_tensors(data: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    r"""A copy of a batch with ``fn`` applied to every tensor :func:`find_tensors` finds.

    The containers are rebuilt (the user's batch is never modified): dicts, ``defaultdict``, ``UserDict``
    subclasses (Hugging Face's ``BatchEncoding``; their other attributes are kept), other ``Mapping``\ s
    built from a dict, named tuples, tuples, lists, and dataclasses (frozen ones too; a shallow copy whose
    fields are replaced). Other objects are returned as they are.

    Raises:
        TypeError: when a container cannot be rebuilt, with what to do.
    """
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, collections.abc.Mapping):
        items = {key: map_tensors(value, fn) for key, value in data.items()}
        if type(data) is dict:
            return items
        if isinstance(data, collections.defaultdict):
            return type(data)(data.default_factory, items)
        if isinstance(data, collections.UserDict):
            out = copy.copy(data)  # UserDict.__copy__ copies its .data: the original is not touched
            out.data = items
            return out
        try:
            return type(data)(items)
        except Exception as error:
            raise TypeError(
                f"Cannot rebuild the batch's {type(data).__name__} with its tensors moved ({error}). Make "
                f"{type(data).__name__}(dict) work, pass a dict instead, or put the batch on the model's "
                "device and dtype yourself before calling analyze (then it is passed through unchanged)."
            ) from error
    if _is_dataclass_instance(data):
        out = copy.copy(data)
        for field in dataclasses.fields(data):
            object.__setattr__(out, field.name, map_tensors(getattr(data, field.name), fn))
        return out
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a named tuple
        return type(data)(*(map_tensors(value, fn) for value in data))
    if isinstance(data, list | tuple):
        items = [map_tensors(value, fn) for value in data]
        return items if type(data) is list else tuple(items) if type(data) is tuple else type(data)(items)
    return data


def batch_size(batch: Any) -> int:
    """Size of a batch: the leading dimension of its first tensor (1 if it holds no tensor with a dim).

    "First" is in the order of :func:`find_tensors`: put a batch-first tensor (the inputs) first, not a
    mask shared by all samples. It weights the batch in the mean loss over several batches, and is the
    dimension ``chunk_size`` splits.
    """
    return next((t.shape[0] for t in find_tensors(batch) if t.ndim > 0), 1)


def split_batch(batch: Any, chunk_size: int | None) -> list[tuple[Any, int]]:
    """Split a batch along its first dimension into chunks of at most ``chunk_size`` samples.

    Args:
        batch: one batch; every tensor with a dimension must have the batch size first.
        chunk_size: the largest chunk; ``None`` keeps the batch whole.

    Returns:
        ``(chunk, size)`` pairs; 0-dimensional tensors go whole into every chunk.

    Raises:
        ValueError: when a tensor's first dimension is not the batch size (the chunks would not be the
            batch's samples).
    """
    n = batch_size(batch)
    if chunk_size is None or n <= chunk_size:
        return [(batch, n)]
    shapes = [tuple(t.shape) for t in find_tensors(batch)]
    if any(shape and shape[0] != n for shape in shapes):
        raise ValueError(
            f"chunk_size={chunk_size} splits each batch along its first dimension (the batch size, {n}: "
            f"the first dimension of its first tensor), but the batch's tensors have shapes {shapes}. Give "
            "every tensor the batch size first (e.g. targets of shape (batch, seq) rather than flattened, "
            "masks shared by all samples built inside the model), or pass chunk_size=None."
        )
    chunks = []
    for start in range(0, n, chunk_size):
        chunk = map_tensors(batch, lambda t, s=start: t[s : s + chunk_size] if t.ndim else t)
        chunks.append((chunk, min(chunk_size, n - start)))
    return chunks


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The batch with its tensors on ``device`` and its floating tensors in ``dtype``.

    A batch already there is returned as it is (not rebuilt), so any object works then.
    """

    def target(t: Tensor) -> tuple[torch.device, torch.dtype]:
        return device, dtype if t.is_floating_point() else t.dtype

    if all((t.device, t.dtype) == target(t) for t in find_tensors(batch)):
        return batch
    return map_tensors(batch, lambda t: t.to(*target(t)))
