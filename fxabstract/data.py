"""Batches and outputs: the shapes of data fxabstract accepts.

A batch is a Tensor (the one input), a dict (keyword inputs), or a pair (inputs, targets) whose
inputs is a Tensor, a tuple or a dict.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .errors import CalibrationError


def split_batch(batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """batch -> (positional inputs, keyword inputs, targets or None)."""
    targets = None
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise CalibrationError(f"a tuple batch must be a pair (inputs, targets), got {len(batch)} items; "
                                   "wrap several inputs as ((x1, x2), targets) or a dict")
        batch, targets = batch
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, targets
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}, targets
    if isinstance(batch, dict):
        return (), dict(batch), targets
    raise CalibrationError(f"a batch must be a Tensor, a dict or an (inputs, targets) pair, got {type(batch).__name__}")


def bind(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """Positional arguments in placeholder order, for fx.Interpreter.run."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = list(args)
    for node in placeholders[len(args):]:
        name = node.target.lstrip("*")
        if name in kwargs:
            out.append(kwargs[name])
        elif node.args:
            out.append(node.args[0])
        else:
            raise CalibrationError(f"the model's input `{name}` is missing from the batch; add it to each batch")
    unknown = set(kwargs) - {n.target for n in placeholders}
    if unknown:
        raise CalibrationError(f"the batch has inputs the model does not take: {sorted(unknown)}; remove them")
    return out


def logits(out) -> torch.Tensor:
    """The model's output as [B, o]: a Tensor, the first Tensor of a tuple, or a dict's 'logits'."""
    if isinstance(out, dict):
        out = out["logits"] if "logits" in out else next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        out = next(v for v in out if isinstance(v, torch.Tensor))
    return out.reshape(out.shape[0], -1)


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    raise CalibrationError("a batch holds no tensor; give the model's inputs as tensors")
