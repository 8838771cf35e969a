"""The built-in demo: a 64-256-256-10 ReLU MLP trained on scikit-learn's digits (1797 8x8 images,
shipped inside scikit-learn), cached in the user's cache folder after the first run.

    >>> x_train, y_train, x_test, y_test = digits_data()
    >>> model = demo_model()            # trains once (seconds), then loads the cached weights
"""
from __future__ import annotations

import io
import os
import warnings

import torch
from torch import nn

from .errors import FxAbstractWarning, OutputError
from .output.files import write_atomic

CACHE_NAME = "digits_mlp-v1.pt"


class DigitsMLP(nn.Module):
    """64 -> 256 -> 256 -> 10; the sites are fc1 (first hidden) and fc2 (penultimate)."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def digits_data(seed: int = 0, test_fraction: float = 0.3):
    """(x_train [n, 64], y_train [n], x_test, y_test): pixels scaled to [0, 1], a fixed shuffle."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 60, seed: int = 0,
          lr: float = 1e-3, batch_size: int = 64) -> nn.Module:
    """Adam on cross-entropy, a fixed seed: deterministic on one machine."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fxabstract")


def demo_model(cache: bool = True) -> DigitsMLP:
    """The trained demo MLP: loaded from the cache (weights_only) or trained and cached."""
    path = os.path.join(cache_dir(), CACHE_NAME)
    model = DigitsMLP()
    if cache and os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    model = DigitsMLP()
    x, y, _, _ = digits_data()
    train(model, x, y)
    if cache:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            write_atomic(path, buf.getvalue())
        except (OSError, OutputError) as exc:  # an unwritable cache costs a retrain next time, nothing else
            warnings.warn(f"cannot cache the demo model in {cache_dir()} ({exc}); it will be trained again "
                          "next time (set XDG_CACHE_HOME to a writable folder)", FxAbstractWarning, stacklevel=2)
    return model
