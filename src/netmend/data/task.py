"""The task adapter: how a batch splits into model inputs and labels, how the model is called,
and how logits are read from its output (kronfluence's ``Task`` in spirit).

The default, :class:`ClassificationTask`, covers what people's classifiers and data loaders
give:

- batches: a tuple/list ``(x, y, ...)`` (inputs first, labels second), or a mapping with the
  labels under ``"labels"`` or ``"label"`` and every other entry a keyword input of the model
  (``input_ids``, ``attention_mask``, ...);
- the call: a tensor (or any non-mapping input) as ``model(x)``, a mapping as ``model(**x)``;
- the output: a tensor ``[B, C]``; a tuple/list (its first element, e.g. ``(logits,
  features)``); a mapping (its ``"logits"``); an object with a ``.logits`` attribute
  (Hugging Face ``ModelOutput``).

Inputs reach the model as the data holds them: integer token ids stay integers and dicts of
tensors stay dicts. Scaling ``uint8`` pixels, if wanted, is the model's or a subclass's job
(override :meth:`Task.inputs`). Subclass :class:`Task` (or :class:`ClassificationTask`) for
anything else and pass it as ``task=`` to :func:`netmend.identify` and friends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

Inputs = Any
"""A batch of model inputs: a tensor ``[B, ...]``, or a dict/tuple/list of such tensors."""


def tree_map(fn: Callable[[torch.Tensor], Any], x: Inputs) -> Inputs:
    """Apply ``fn`` to every tensor of a nested dict/tuple/list; other leaves are kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple
        return type(x)(*(tree_map(fn, v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    return x


def tensors_of(x: Inputs) -> list[torch.Tensor]:
    """The tensors of a nested dict/tuple/list, in order."""
    out: list[torch.Tensor] = []
    tree_map(out.append, x)
    return out


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    """Move every tensor of a (nested) batch of inputs to ``device``."""
    return tree_map(lambda t: t.to(device), x)


def rows(x: Inputs, index: Any) -> Inputs:
    """Rows ``index`` (a slice or an index tensor) of every tensor of a batch of inputs."""
    return tree_map(lambda t: t[index], x)


def batch_len(x: Inputs) -> int:
    """The batch size of a (nested) batch of inputs: the first dimension of its first tensor."""
    ts = tensors_of(x)
    if not ts:
        raise TypeError(f"the model inputs hold no tensor ({type(x).__name__}); cannot batch them")
    if ts[0].ndim == 0:
        raise ValueError("model inputs must have a batch dimension; got a 0-d tensor")
    return int(ts[0].shape[0])


class MissingLabel(ValueError):
    """A batch's labels hold ``None`` (an example without a label).

    Attributes:
        positions: where in the batch.
    """

    def __init__(self, positions: list[int]) -> None:
        self.positions = positions
        super().__init__(
            f"the labels hold None at batch positions {positions[:5]}: every example needs its "
            "class index (drop the unlabelled ones, or label them)"
        )


def _labels(v: Any) -> torch.Tensor:
    """A batch's labels as a tensor; ``None`` among them refused by position (torch said only
    "Could not infer dtype of NoneType")."""
    if isinstance(v, (list, tuple)):
        missing = [i for i, e in enumerate(v) if e is None]
        if missing:
            raise MissingLabel(missing)
    return torch.as_tensor(v)


class Task:
    """How netmend reads a batch and a model's output. Subclass it to adapt other conventions.

    Every method works on whole batches. The defaults are those of :class:`ClassificationTask`.
    """

    label_keys: tuple[str, ...] = ("labels", "label")

    def inputs_and_labels(self, batch: Any) -> tuple[Inputs, torch.Tensor]:
        """Split a collated batch into the model inputs and the labels ``[B]`` (int64).

        Args:
            batch: what the ``DataLoader``'s ``collate_fn`` returns: ``(x, y, ...)``, or a
                mapping with ``"labels"``/``"label"`` and the model's keyword inputs.

        Returns:
            ``(inputs, labels)``: inputs as the model takes them (a tensor or a dict of
            tensors), labels ``[B]``.

        Raises:
            TypeError: a batch of another form (subclass :class:`Task` to read it).
        """
        if isinstance(batch, Mapping):
            key = next((k for k in self.label_keys if k in batch), None)
            if key is None:
                raise TypeError(
                    "each batch must be (x, y) or a dict with its labels under one of "
                    f"{list(self.label_keys)}; got a dict with keys {sorted(map(str, batch))}. "
                    "Rename the key or pass task= a netmend.data.task.Task subclass"
                )
            rest = {k: v for k, v in batch.items() if k != key}
            return self.inputs(rest), _labels(batch[key])
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return self.inputs(batch[0]), _labels(batch[1])
        raise TypeError(
            f"each batch must be (x, y) or a dict with 'labels'; got {type(batch).__name__}. "
            "Pass task= a netmend.data.task.Task subclass that reads it"
        )

    def inputs(self, x: Inputs) -> Inputs:
        """The model inputs of a batch (hook for conversions; the default keeps them as they
        are: integer token ids stay integers)."""
        return x

    def call(self, model: Callable[..., Any], x: Inputs) -> Any:
        """Call ``model`` on a batch of inputs: ``model(**x)`` for a mapping, else ``model(x)``."""
        if isinstance(x, Mapping):
            return model(**x)
        return model(x)

    def logits(self, output: Any) -> torch.Tensor:
        """The logits ``[B, C]`` in a model's output.

        A tensor is taken as is; a tuple/list gives its first element; a mapping its
        ``"logits"``; any other object its ``.logits`` attribute.

        Raises:
            TypeError: no logits can be found.
            ValueError: they are not of shape ``[B, C]``.
        """
        out = output
        if isinstance(out, (tuple, list)) and out and not isinstance(out, torch.Tensor):
            out = out[0]
        elif isinstance(out, Mapping):
            if "logits" not in out:
                raise TypeError(
                    f"the model returned a mapping without 'logits' (keys {sorted(map(str, out))})"
                    "; return the logits under 'logits' or pass a Task subclass that finds them"
                )
            out = out["logits"]
        elif not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
            out = out.logits
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"cannot read logits from the model's output ({type(output).__name__}): return a "
                "tensor [batch, classes], a tuple starting with it, a dict with 'logits' or an "
                "object with .logits, or pass a netmend.data.task.Task subclass that reads it"
            )
        if out.ndim != 2:
            raise ValueError(
                "model output must be logits of shape [batch, classes]; got shape "
                f"{tuple(out.shape)}"
            )
        return out

    def forward(self, model: Callable[..., Any], x: Inputs) -> torch.Tensor:
        """Logits ``[B, C]`` of ``model`` on a batch of inputs (call, then read the logits)."""
        return self.logits(self.call(model, x))


class ClassificationTask(Task):
    """The default task: ``(x, y)`` or dict batches, tensor/tuple/dict/``.logits`` outputs."""


DEFAULT_TASK = ClassificationTask()


def overrides(task: Task, method: str) -> bool:
    """Whether ``task``'s class overrides :class:`Task`'s ``method`` (e.g. "inputs")."""
    return getattr(type(task), method) is not getattr(Task, method)


def resolve_task(task: Task | None) -> Task:
    """``task``, or the default :class:`ClassificationTask` for ``None``; raises on other types."""
    if task is None:
        return DEFAULT_TASK
    if not isinstance(task, Task):
        raise TypeError(
            f"task must be a netmend.data.task.Task (e.g. ClassificationTask()); got "
            f"{type(task).__name__}"
        )
    return task
