"""Front end: a user's nn.Module -> torch.fx.GraphModule, on a copy, in eval mode.

    >>> gm = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'call_module', 'output']

The user's model is never touched: we trace a deep copy, switched to eval mode (dropout off,
BatchNorm on running statistics), because the abstraction is of the deployed function.
"""
from __future__ import annotations

import copy
import os
import traceback

import torch.fx as fx
from torch import nn

from .errors import CaptureError

_TORCH_DIR = os.path.dirname(os.path.dirname(nn.__file__))


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's line that stopped tracing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.basename(os.path.dirname(f.filename)) != "fxabstract"]
    if not frames:
        return "inside torch"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`"


def capture(model: nn.Module) -> fx.GraphModule:
    """Trace an eval-mode deep copy of `model` with torch.fx.symbolic_trace."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
    model_copy = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model_copy)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... for untraceable code
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__} at {_user_frame(exc)}: {reason}; "
            "make that line free of data-dependent Python control flow (fxabstract captures with torch.fx.symbolic_trace)"
        ) from None
    for node in gm.graph.nodes:  # `from __future__ import annotations` leaves types as strings,
        if isinstance(node.type, str):  # which GraphModule cannot pickle
            node.type = None
    gm.recompile()
    gm.eval()
    return gm
