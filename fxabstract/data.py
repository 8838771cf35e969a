"""Batches and outputs: the shapes of data fxabstract accepts, and which output it preserves.

A batch is a Tensor (the one input), a dict (keyword inputs), or a pair (inputs, targets) whose
inputs is a Tensor, a tuple or a dict; a one-element list or tuple [inputs] (what a DataLoader over
`TensorDataset(x)` yields) is its inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .errors import CalibrationError, ConfigError


def split_batch(batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """batch -> (positional inputs, keyword inputs, targets or None)."""
    targets = None
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        batch = batch[0]              # a DataLoader over one tensor (TensorDataset(x)) yields [x]
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


def tensors_of(out) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model's output with their names: `output` for a Tensor, the index of a tuple or
    list item (`0`, `1`), the key of a dict or of a Hugging Face ModelOutput (`logits`)."""
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    if isinstance(out, dict) or hasattr(out, "keys") and hasattr(out, "__getitem__"):
        return [(str(k), out[k]) for k in out.keys() if isinstance(out[k], torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    return []


def default_output(out):
    """The output to preserve when none is named: the Tensor itself, a dict's 'logits', else the first
    tensor (an index or a key, as `select_output` takes it)."""
    named = tensors_of(out)
    if not named:
        raise CalibrationError(f"the model returns a {type(out).__name__} with no tensor in it; "
                               "pass output= a callable that picks the tensor to preserve")
    if isinstance(out, torch.Tensor):
        return None
    keys = [k for k, _ in named]
    if "logits" in keys:
        return "logits"
    return int(keys[0]) if isinstance(out, (tuple, list)) else keys[0]


def select_output(out, output=None) -> torch.Tensor:
    """The tensor of the model's output `out` that the abstraction preserves: output=None (the default
    one, `default_output`), an int (a tuple or list item), a str (a dict or ModelOutput key) or a callable
    (out -> Tensor)."""
    if output is None:
        output = default_output(out)
        if output is None:
            return out
    if isinstance(out, torch.Tensor) and not callable(output):
        raise ConfigError(f"output={output!r} picks from several outputs, but the model returns one tensor "
                          f"{list(out.shape)}; leave output=None (or pass a callable)")
    try:
        picked = output(out) if callable(output) else out[output]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        names = [k for k, _ in tensors_of(out)]
        raise ConfigError(f"output={output!r} does not pick a tensor of the model's output ({type(exc).__name__}: "
                          f"{exc}); the output's tensors are {names}: pass one of them, or a callable") from None
    if not isinstance(picked, torch.Tensor):
        raise ConfigError(f"output={output!r} picks a {type(picked).__name__}, not a tensor; pass an index, a key or "
                          "a callable that returns the tensor to preserve")
    return picked


def logits(out, output=None) -> torch.Tensor:
    """The preserved output (`select_output`) as [B, o]."""
    z = select_output(out, output)
    return z.reshape(z.shape[0], -1) if z.dim() else z.reshape(1, 1)


def output_kind(z: torch.Tensor, output) -> str:
    """"classes" when the preserved output is class logits: a tensor named "logits" ([B, C], or a sequence
    model's [B, T, V]: classes per position), or [B, C] with C >= 2 that is the model's one output or a
    tuple item picked by index; else "values" (regression, embeddings, any other key or a callable's
    pick), on which top-1 agreement and IIA are not defined. `output_kind=` overrides it."""
    if output == "logits" and z.dim() >= 2 and z.shape[-1] >= 2:
        return "classes"
    if (output is None or isinstance(output, int)) and z.dim() == 2 and z.shape[1] >= 2:
        return "classes"
    return "values"



def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    raise CalibrationError("a batch holds no tensor; give the model's inputs as tensors")


@dataclass
class Inputs:
    """A set of model inputs: positional `args` and keyword `kwargs`. Every tensor's first axis is the
    batch axis (the rule everywhere a model is run); other values are passed as they are."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()]

    def __len__(self) -> int:
        tensors = self.tensors()
        return len(tensors[0]) if tensors else 0

    def take(self, index) -> "Inputs":
        """The samples `index` (an index tensor, a slice) of every batched tensor."""
        n = len(self)
        pick = lambda v: v[index] if isinstance(v, torch.Tensor) and v.dim() and len(v) == n else v  # noqa: E731
        return Inputs(tuple(pick(a) for a in self.args), {k: pick(v) for k, v in self.kwargs.items()})

    def to(self, device) -> "Inputs":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Inputs(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()})

    def run(self, model):
        return model(*self.args, **self.kwargs)

    def describe(self) -> str:
        named = [(f"input {i}", a) for i, a in enumerate(self.args)] + [(repr(k), v) for k, v in self.kwargs.items()]
        return ", ".join(f"{name} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for name, v in named
                         if isinstance(v, torch.Tensor))


def as_inputs(data, limit: int = 100_000) -> Inputs:
    """Evaluation inputs in the forms of a calibration batch: a Tensor (the one input), a tuple of
    positional tensors, a dict of keyword tensors; or an iterable of batches (each a Tensor, a dict or an
    (inputs, targets) pair), concatenated along the batch axis, at most `limit` samples."""
    if isinstance(data, torch.Tensor):
        return Inputs((data,), {})
    if isinstance(data, tuple):
        return Inputs(data, {})
    if isinstance(data, dict):
        return Inputs((), dict(data))
    parts, n = [], 0
    for batch in data:
        args, kwargs, _ = split_batch(batch)
        part = Inputs(args, kwargs)
        parts.append(part)
        n += len(part)
        if n >= limit:
            break
    if not parts or not n:
        raise CalibrationError("the evaluation data is empty; pass at least one batch of inputs")
    first = parts[0]
    for i, part in enumerate(parts[1:], 1):
        if len(part.args) != len(first.args) or part.kwargs.keys() != first.kwargs.keys() or any(
                a.shape[1:] != b.shape[1:] for a, b in zip(part.tensors(), first.tensors())):
            raise CalibrationError(f"evaluation batch {i} has {part.describe()} but batch 0 had {first.describe()}; "
                                   "give every batch the same inputs and shapes (but the batch axis), or pass one "
                                   "batch")
    cat = lambda vs: torch.cat(vs)[:limit] if isinstance(vs[0], torch.Tensor) and vs[0].dim() else vs[0]  # noqa: E731
    return Inputs(tuple(cat([p.args[i] for p in parts]) for i in range(len(first.args))),
                  {k: cat([p.kwargs[k] for p in parts]) for k in first.kwargs})
