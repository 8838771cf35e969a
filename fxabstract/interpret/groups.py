"""Finite-group operation tasks (docs/math.md §5, compact proofs): multiplication tables, the
one-hidden-layer network of Wu et al. that learns (x, y) -> x*y, and its training recipe.

    >>> table = cyclic_table(59)                 # [59, 59]: table[x, y] = (x + y) mod 59
    >>> table = symmetric_table(5)               # [120, 120]: composition of permutations of 5 items
    >>> model = train_group_model(table, seed=0) # CPU, one thread: 15-80 s (Z_59 .. S5 on a loaded box)
    >>> brute_force_accuracy(model, table)       # accuracy over all |G|^2 inputs

The network: separate left and right embeddings (no shared weights), a Linear `hidden` layer on
their concatenation, a ReLU, and a Linear `unembed` to |G| logits. Its one site is `hidden`.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn


def cyclic_table(n: int) -> torch.Tensor:
    """Z_n: table[x, y] = (x + y) mod n, [n, n] long."""
    r = torch.arange(n)
    return (r[:, None] + r[None, :]) % n


def symmetric_table(k: int = 5) -> torch.Tensor:
    """S_k: elements are the permutations of range(k) in lexicographic order (index 0 = identity);
    table[x, y] = index of the composition x∘y, i.e. (x∘y)(i) = x(y(i)). [k!, k!] long."""
    perms = list(itertools.permutations(range(k)))
    index = {p: i for i, p in enumerate(perms)}
    p = torch.tensor(perms)                                  # [k!, k]
    composed = p[:, p]                                      # [k!, k!, k]: composed[x, y, i] = p[x][p[y][i]]
    flat = [index[tuple(row)] for row in composed.reshape(-1, k).tolist()]
    return torch.tensor(flat).reshape(len(perms), len(perms))


def domain(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input of the group operation: (pairs [n*n, 2] long, labels [n*n] long), x-major order."""
    n = table.shape[0]
    x, y = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1), table.reshape(-1)


class GroupMLP(nn.Module):
    """logits(x, y) = unembed(relu(hidden([left(x), right(y)]))); the site is `hidden`."""

    def __init__(self, n: int, embed: int = 32, width: int = 128):
        super().__init__()
        self.left = nn.Embedding(n, embed)
        self.right = nn.Embedding(n, embed)
        self.hidden = nn.Linear(2 * embed, width)
        self.unembed = nn.Linear(width, n)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.left(xy[:, 0]), self.right(xy[:, 1])], dim=-1)
        return self.unembed(torch.relu(self.hidden(e)))


def train_group_model(table: torch.Tensor, seed: int = 0, embed: int = 32, width: int = 128,
                      train_fraction: float = 0.6, steps: int = 6000, lr: float = 3e-3,
                      weight_decay: float = 1.0, batch_size: int = 2048) -> GroupMLP:
    """The recipe: a seeded random split (train_fraction of the |G|^2 pairs), AdamW(lr, betas (0.9, 0.98),
    weight_decay) on cross-entropy, minibatches of batch_size drawn from the training pairs, `steps`
    steps with a linear warm-up over the first 10%. Deterministic for a seed on one machine."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = table.shape[0]
    model = GroupMLP(n, embed, width)
    xy, labels = domain(table)
    train = torch.randperm(len(xy), generator=gen)[: int(train_fraction * len(xy))]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    model.train()
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (min(batch_size, len(train)),), generator=gen)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xy[idx]), labels[idx]).backward()
        opt.step()
        sched.step()
    return model.eval()


def brute_force_accuracy(model: nn.Module, table: torch.Tensor, batch_size: int = 4096) -> float:
    """Accuracy of `model` over all |G|^2 inputs, by running it on every one (the brute-force proof)."""
    xy, labels = domain(table)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xy), batch_size):
            correct += int((model(xy[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
    return correct / len(xy)
