"""Replacement maps fitted beyond their site (docs/math.md §8): the plans' beta and theta refitted so that
the network as a whole, not each site alone, stays close to the dense model. Kept units and every weight
of the model stay as they are: the compiled module is still the original under do(a_P := beta + theta a_K).

- "sequential": site after site in graph order, each affine map is fitted by least squares of the dense
  model's removed units on the kept units *of the network whose earlier sites are already replaced*, so a
  later site absorbs what the earlier ones got wrong. A closed form per site; one forward pass of the
  dense and of the replaced network, run in stages from site to site (`_Sweep`).
- "outputs": starting from the plans given (the closed form), beta and theta are moved by gradient descent
  (Adam) on the output divergence of the intervened model to the dense one (KL for class logits, relative
  squared error for other outputs), with a ridge towards the start as a regulariser, and early stopping
  on held-back samples. The ridge and the number of epochs are chosen on the held-back samples.

Both run on the samples the analysis kept: the calibration reservoir and the fit data (`fit_pool`).

    >>> plans = refit_sequential(gm, plans, fit_pool(stats), ridges)
    >>> plans, record = refit_outputs(gm, plans, fit_pool(stats), stats)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from ..data import output_kind, select_output
from ..errors import ConfigError
from .calibrate import Statistics, site_rows
from .moments import Moments
from .plan import SitePlan
from .replace import replace, replacement_target
from .risk import affine_curvature, fit_affine

FITS = ("local", "sequential", "outputs")
OUTPUT_FIT_DEFAULTS = {"epochs": 4, "lr": 1e-3, "ridges": (1e-2, 1e-4), "held_back": 0.25, "patience": 2,
                       "loss": "auto", "mixup": True, "theta": True}
LOSSES = ("auto", "kl", "logits", "squared")
SEQUENTIAL_DEFAULTS = {"correct": False}


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


class _Until(fx.Interpreter):
    """Runs the graph up to node `stop` and returns that node's value (the rest is not computed)."""

    def __init__(self, gm: fx.GraphModule, stop: str):
        super().__init__(gm)
        self.stop = stop

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name == self.stop:
            raise _Stop(out)
        return out

    def value(self, inputs: list) -> torch.Tensor:
        try:
            self.run(*inputs)
        except _Stop as stop:
            return stop.value
        raise AssertionError(f"node {self.stop} not in the graph")   # pragma: no cover - sites come from the graph


def fit_pool(stats: Statistics) -> list:
    """The samples an extended fit runs on: the calibration reservoir, then the kept fit data."""
    return list(stats.reservoir) + list(stats.fit_reservoir)


def _items(plans: list[SitePlan]) -> list[SitePlan]:
    """Every replacement with removed units (sites and their SE squeezes)."""
    return [q for p in plans for q in (p, *p.branches) if q.removed]


def _valid(inputs: list, mask_index: int | None, like: torch.Tensor) -> torch.Tensor | None:
    """[B, T] bool: the real positions of a sample chunk by its mask input, when `like` has T positions."""
    if mask_index is None:
        return None
    m = inputs[mask_index]
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or like.dim() < 2 or like.shape[1] != m.shape[1]:
        return None
    return m != 0


class _Sweep:
    """One graph run forward over the pool in stages: `advance(node)` runs every chunk from the last cut
    to `node` and keeps only the values that later nodes read (the frontier), so a pass over S sites in
    order costs one forward pass of the graph, not S."""

    def __init__(self, gm: fx.GraphModule, pool: list):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.pool = [inputs for inputs, _ in pool]
        self.states: list[dict] = [{} for _ in self.pool]
        self.cut = -1

    def advance(self, name: str) -> list[torch.Tensor]:
        """Per chunk, the value of node `name` (later than the previous cut)."""
        cut = self.index[name]
        frontier = [n for n in self.nodes[:cut + 1] if any(self.index[u.name] > cut for u in n.users)]
        values = []
        for k, inputs in enumerate(self.pool):
            run = _Until(self.gm, name)
            env = {n: self.states[k].get(n) for n in self.nodes[:self.cut + 1]}
            try:
                run.run(*inputs, initial_env=env)
            except _Stop as stop:
                value = stop.value
            run.env[self.nodes[cut]] = value
            self.states[k] = {n: run.env[n] for n in frontier}
            values.append(value)
        self.cut = cut
        return values


@torch.no_grad()
def refit_sequential(gm: fx.GraphModule, plans: list[SitePlan], pool: list, ridges: dict[str, float],
                     mask_index: int | None = None, stats: Statistics | None = None) -> list[SitePlan]:
    """Plans whose affine maps are refitted in graph order on the partly replaced network (module doc):
    the dense a_P regressed on the replaced network's kept a~_K. With `stats` (the site's output curvature
    H; fit_options correct=True), the target of the removed units is not the dense a_P
    alone but a_P - C (a~_K - a_K) (`_correction`): what the kept units a~_K drifted from the dense a_K is
    made up for where the output is sensitive to it. Constant replacements are left as they are: the dense
    model's removed units do not depend on the replaced network, so their fitted constant would not change.
    Cost: one forward pass of the dense and of the replaced graph over the pool, plus the d x d moments;
    memory: both graphs' values at the current site for every pooled sample."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    items = sorted((q for q in _items(plans) if q.kind == "affine"), key=lambda q: order[q.site.node])
    ridge = {id(q): ridges[p.site.name] for p in plans for q in (p, *p.branches)}   # an SE squeeze: its site's
    fitted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    current = replace(gm, plans)
    dense, replaced = _Sweep(gm, pool), _Sweep(current, pool)
    for q in items:
        moments = Moments.empty(q.site.n_units, True)
        K, P = torch.tensor(q.kept, dtype=torch.long), torch.tensor(q.removed, dtype=torch.long)
        C = _correction(stats, q)
        for (inputs, _), a, a_rep in zip(pool, dense.advance(q.site.node), replaced.advance(q.site.node)):
            valid = _valid(inputs, mask_index, a)
            rows, rows_rep = site_rows(a, q.site.axis, valid).double(), site_rows(a_rep, q.site.axis, valid).double()
            target = rows[:, P]
            if C is not None:     # the removed units also make up for the kept units' drift, as the output sees it
                target = target + (rows[:, K] - rows_rep[:, K]) @ C.T
            rows_rep[:, P] = target
            moments.update(rows_rep)
        beta, theta = fit_affine(moments.mean, moments.cov, q.kept, q.removed, ridge[id(q)], q.site.fit_parts)
        fitted[id(q)] = (beta, theta)
        module = current.get_submodule(replacement_target(q.site.name))
        module.beta.copy_(beta.to(module.beta))
        module.theta.copy_(theta.to(module.theta))
    return _rebuilt(plans, fitted)


def _correction(stats: Statistics | None, q: SitePlan) -> torch.Tensor | None:
    """C [|P|, |K|] = (H_PP + eps)^-1 H_PK with H the site's output curvature (`risk.affine_curvature`):
    the removed units' values that best cancel a drift e_K of the kept ones in the second-order output
    divergence 1/2 e^T H e are -C e_K. None where the site has no d x d curvature (an SE squeeze, a site
    kept to O(d) statistics)."""
    k = None if stats is None else stats.curvature.get(q.site.name)
    if k is None or k.H0 is None or not q.kept:
        return None
    H = affine_curvature(stats, q.site.name)
    K, P = q.kept, q.removed
    HPP = H[P][:, P]
    eps = 1e-3 * float(HPP.diagonal().mean().clamp_min(1e-30))
    return torch.linalg.solve(HPP + eps * torch.eye(len(P), dtype=H.dtype), H[P][:, K])


def _rebuilt(plans: list[SitePlan], fitted: dict) -> list[SitePlan]:
    """`plans` with the refitted (beta, theta) of the items in `fitted` (by id)."""
    def one(q: SitePlan) -> SitePlan:
        if id(q) not in fitted:
            return q
        beta, theta = fitted[id(q)]
        return dataclasses.replace(q, beta=beta.detach().double().cpu(), theta=theta.detach().double().cpu())
    return [dataclasses.replace(one(p), branches=[one(b) for b in p.branches]) for p in plans]


class _Maps:
    """The trainable form of the replacements: per item, beta = beta0 + s_P * b - dtheta mu_K and
    theta = theta0 + dtheta, dtheta = s_P Phi / (s_K sqrt|K|) (zero across a grouped consumer's parts),
    with s the units' standard deviations and mu_K the kept units' means. b and Phi are what Adam moves:
    in these units a step changes the replaced values by a fraction of their own spread, whatever the
    site's scale, and the ridge sum(b^2 + |Phi|^2 / |K|) / sum |P| is about the mean squared change of
    the replaced values relative to their spread."""

    def __init__(self, items: list[SitePlan], stats: Statistics, like: torch.Tensor, theta: bool = True):
        self.items, self.like = items, like
        self.base, self.scale, self.free = [], [], []
        for q in items:
            m = stats.moments.get(q.site.name) or stats.branch_moments[q.site.name]
            sd = m.var.sqrt()
            sd = sd.clamp_min(1e-6 * float(sd.max()) + 1e-30).to(like)
            mu = m.mean.to(like)
            K, P = q.kept, q.removed
            beta0, theta0 = q.beta.to(like), q.theta.to(like)
            b = torch.zeros(len(P), dtype=like.dtype, device=like.device, requires_grad=True)
            phi = (torch.zeros(len(P), len(K), dtype=like.dtype, device=like.device, requires_grad=True)
                   if q.kind == "affine" and K and theta else None)
            mask = _part_mask(q) if phi is not None else None
            self.base.append((beta0, theta0))
            self.scale.append((sd[P], sd[K], mu[K], None if mask is None else mask.to(like)))
            self.free.append((b, phi))
        self.removed = sum(len(q.removed) for q in items)

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.free for t in pair if t is not None]

    def values(self) -> dict[str, torch.Tensor]:
        """{buffer name of the replaced graph: value} for torch.func.functional_call."""
        out = {}
        for q, (beta0, theta0), (sP, sK, muK, mask), (b, phi) in zip(self.items, self.base, self.scale, self.free):
            name = replacement_target(q.site.name)
            beta = beta0 + sP * b
            theta = theta0
            if phi is not None:
                dtheta = sP[:, None] * (phi if mask is None else phi * mask) / (sK[None, :] * math.sqrt(len(q.kept)))
                theta = theta0 + dtheta
                beta = beta - dtheta @ muK
            out[f"{name}.beta"], out[f"{name}.theta"] = beta, theta
        return out

    def penalty(self) -> torch.Tensor:
        total = self.like.new_zeros(())
        for q, (b, phi) in zip(self.items, self.free):
            total = total + b.pow(2).sum()
            if phi is not None:
                total = total + phi.pow(2).sum() / len(q.kept)
        return total / max(self.removed, 1)

    def state(self) -> list:
        return [(b.detach().clone(), None if phi is None else phi.detach().clone()) for b, phi in self.free]

    def load(self, state: list) -> None:
        with torch.no_grad():
            for (b, phi), (b0, phi0) in zip(self.free, state):
                b.copy_(b0)
                if phi is not None:
                    phi.copy_(phi0)

    def fitted(self) -> dict:
        values = self.values()
        return {id(q): (values[f"{replacement_target(q.site.name)}.beta"].detach(),
                        values[f"{replacement_target(q.site.name)}.theta"].detach()) for q in self.items}


def _part_mask(q: SitePlan) -> torch.Tensor | None:
    """[|P|, |K|] 1 where a replaced unit may read a kept unit (its own part of a grouped consumer)."""
    parts = q.site.fit_parts
    if parts <= 1:
        return None
    size = q.site.n_units // parts
    P, K = torch.tensor(q.removed) // size, torch.tensor(q.kept) // size
    return (P[:, None] == K[None, :]).double()


def _split(pool: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training chunks, held-back chunks): a seeded random `fraction` of the samples held back, each chunk
    split in two so that chunks stay batch-shaped."""
    sizes = [_size(inputs) for inputs, _ in pool]
    n = sum(sizes)
    held = max(1, round(fraction * n))
    if n < 4 or held >= n:
        raise ConfigError(f"fit='outputs' needs at least 4 samples to hold some back for early stopping, got {n}; "
                          "pass more calibration data or fit_data, or fit='sequential'")
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:held]] = True
    train, back, start = [], [], 0
    for (inputs, targets), size in zip(pool, sizes):
        mine = chosen[start:start + size]
        start += size
        for keep, out in ((~mine, train), (mine, back)):
            if keep.any():
                idx = keep.nonzero().flatten()
                out.append([v.index_select(0, idx.to(v.device)) if isinstance(v, torch.Tensor) and v.dim()
                            and v.shape[0] == size else v for v in inputs])
    return train, back


def _size(inputs: list) -> int:
    return next(v.shape[0] for v in inputs if isinstance(v, torch.Tensor) and v.dim())


class _Divergence:
    """The output divergence to the dense model, per real sample (or position): "kl", KL(p || p_I) over the
    last axis (class logits); "logits", 0.5 |z - z_I|^2 of the logits centred over the last axis (softmax
    ignores a shift), relative to their variance; "squared", 0.5 |z - z_I|^2 relative to the dense outputs'
    variance (1 - R^2 / 2 in effect)."""

    def __init__(self, loss: str, variance: float = 1.0):
        self.loss, self.variance = loss, variance

    def __call__(self, z: torch.Tensor, zi: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """(sum over real positions, their count)."""
        if self.loss == "kl":
            lp = z.log_softmax(-1)
            per = (lp.exp() * (lp - zi.log_softmax(-1))).sum(-1)          # [B] or [B, T, ...]
        elif self.loss == "logits":
            e = z - zi
            per = 0.5 * (e - e.mean(-1, keepdim=True)).pow(2).sum(-1) / self.variance
        else:
            per = 0.5 * (z - zi).pow(2).reshape(z.shape[0], -1).sum(-1) / self.variance
        if valid is not None and per.dim() >= 2 and per.shape[1] == valid.shape[1]:
            per = per.reshape(*valid.shape, -1)[valid]
        return per.sum(), per.numel()


def check_fit(fit: str, options) -> dict:
    """The fit's options (defaults filled in: OUTPUT_FIT_DEFAULTS, SEQUENTIAL_DEFAULTS), checked: a
    ConfigError names what is wrong."""
    if fit not in FITS:
        raise ConfigError(f"unknown fit {fit!r}; choose one of {', '.join(FITS)}")
    defaults = {"outputs": OUTPUT_FIT_DEFAULTS, "sequential": SEQUENTIAL_DEFAULTS}.get(fit)
    if options is not None and (defaults is None or not isinstance(options, dict)):
        raise ConfigError(f"fit_options={options!r} applies to fit='outputs' or 'sequential' only, as a dict of "
                          "their options (docs/api.md); leave it None")
    opts = {**(defaults or {}), **(options or {})}
    unknown = set(opts) - set(defaults or {})
    if unknown:
        raise ConfigError(f"unknown fit_options {sorted(unknown)} for fit={fit!r}; its options are {sorted(defaults)}")
    if fit == "local":
        return opts
    if fit == "sequential":
        if not isinstance(opts["correct"], bool):
            raise ConfigError(f"fit_options correct={opts['correct']!r} must be True or False")
        return opts
    if opts["loss"] not in LOSSES:
        raise ConfigError(f"fit_options loss={opts['loss']!r}; choose one of {', '.join(LOSSES)}")
    ridges = opts["ridges"]
    numbers = [opts["lr"], opts["held_back"], *(ridges if isinstance(ridges, (list, tuple)) else [None])]
    if (not isinstance(ridges, (list, tuple)) or not ridges or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                                    or not math.isfinite(v) or v < 0 for v in numbers)
            or not 0 < opts["held_back"] < 1 or opts["lr"] <= 0):
        raise ConfigError(f"fit_options lr={opts['lr']!r}, held_back={opts['held_back']!r}, ridges={ridges!r}: give lr "
                          "> 0, held_back in (0, 1) and a non-empty list of ridges >= 0")
    for key in ("mixup", "theta"):
        if not isinstance(opts[key], bool):
            raise ConfigError(f"fit_options {key}={opts[key]!r} must be True or False")
    for key in ("epochs", "patience"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
            raise ConfigError(f"fit_options {key}={opts[key]!r} must be a positive int")
    return opts


def _mixed(gm: fx.GraphModule, inputs: list, output, generator: torch.Generator, z: torch.Tensor):
    """(inputs, dense outputs) of a mixup of the chunk with a shuffle of itself: every floating-point batch
    input becomes lam x + (1 - lam) x[perm], lam ~ U(0, 1) per sample (integer inputs, token ids, stay)."""
    B = _size(inputs)
    lam = torch.rand(B, generator=generator)
    perm = torch.randperm(B, generator=generator)
    mixed, changed = [], False
    for v in inputs:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() and v.shape[0] == B:
            w = lam.to(v).reshape(B, *([1] * (v.dim() - 1)))
            v, changed = w * v + (1 - w) * v[perm.to(v.device)], True
        mixed.append(v)
    if not changed:
        return inputs, z
    with torch.no_grad():
        return mixed, select_output(fx.Interpreter(gm).run(*mixed), output).detach()


class _Targets:
    """The dense model's outputs per chunk: computed once and held while they take at most `limit`
    elements (2^27: 512 MiB of float32), else recomputed when asked for (a language model's [B, T, V]
    logits over thousands of samples)."""

    def __init__(self, gm: fx.GraphModule, chunks: list, output, limit: int = 2**27):
        self.gm, self.chunks, self.output = gm, chunks, output
        self.held = None
        if chunks:
            first = self._compute(0)
            if first.numel() * sum(_size(c) for c in chunks) <= limit * _size(chunks[0]):
                self.held = [first] + [self._compute(i) for i in range(1, len(chunks))]

    @torch.no_grad()
    def _compute(self, i: int) -> torch.Tensor:
        return select_output(fx.Interpreter(self.gm).run(*self.chunks[i]), self.output).detach()

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.held[i] if self.held is not None else self._compute(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def refit_outputs(gm: fx.GraphModule, plans: list[SitePlan], pool: list, stats: Statistics, output=None,
                  mask_index: int | None = None, seed: int = 0, options: dict | None = None
                  ) -> tuple[list[SitePlan], dict]:
    """Plans whose beta and theta minimise the output divergence to the dense model (module doc), and the
    record of the fit for the report. options: OUTPUT_FIT_DEFAULTS's keys (epochs: the most passes over
    the training samples per ridge; lr: Adam's step; ridges: the ridge weights tried, largest first, each
    continuing from the best state of the one before; held_back: the fraction of samples held back;
    patience: epochs without a held-back improvement before a ridge's run stops; loss: "auto" (KL for class
    logits, else "squared"), "kl", "logits" or "squared" (`_Divergence`); mixup: train on mixups of the
    training chunks (`_mixed`), the dense outputs recomputed for them; the held-back samples stay as they are;
    theta: move theta too (False: the constants beta alone, |P| numbers per site instead of |P| (|K| + 1))."""
    opts = check_fit("outputs", options)
    items = _items(plans)
    like = next(gm.parameters())
    current = replace(gm, plans)
    weights = {k: v.detach() for k, v in current.named_parameters()}
    train, back = _split(pool, float(opts["held_back"]), seed)
    z_train, z_back = _Targets(gm, train, output), _Targets(gm, back, output)
    kind = output_kind(z_train[0], output)
    loss = opts["loss"]
    if loss == "auto":
        loss = "kl" if kind == "classes" else "squared"
    variance = 1.0
    if loss != "kl":
        flat = torch.cat([z.reshape(-1, z.shape[-1]) if loss == "logits" else z.reshape(z.shape[0], -1)
                          for z in z_train]).double()
        if loss == "logits":
            flat = flat - flat.mean(-1, keepdim=True)
            variance = float(flat.pow(2).sum(-1).mean().clamp_min(1e-30))
        else:
            variance = float(flat.var(0, unbiased=False).sum().clamp_min(1e-30))
    D = _Divergence(loss, variance)
    maps = _Maps(items, stats, like, bool(opts["theta"]))

    def run(inputs):
        values = maps.values()
        return select_output(torch.func.functional_call(current, {**weights, **values}, tuple(inputs)), output)

    def evaluate(chunks, targets) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for inputs, z in zip(chunks, targets):
                s, c = D(z, run(inputs), _valid(inputs, mask_index, z))
                total, count = total + float(s), count + c
        return total / max(count, 1)

    start_train, start_back = evaluate(train, z_train), evaluate(back, z_back)
    best = (start_back, maps.state(), None, 0)        # (held-back loss, state, ridge, epochs)
    params = maps.parameters()
    generator = torch.Generator().manual_seed(seed)
    history = []
    epochs_run = 0
    for ridge in sorted((float(r) for r in opts["ridges"]), reverse=True):
        if not params:
            break
        maps.load(best[1])
        optimizer = torch.optim.Adam(params, lr=float(opts["lr"]))
        stale, best_here = 0, best[0]
        for epoch in range(int(opts["epochs"])):
            for i in torch.randperm(len(train), generator=generator).tolist():
                inputs, z = train[i], z_train[i]
                if opts["mixup"]:
                    inputs, z = _mixed(gm, inputs, output, generator, z)
                s, c = D(z, run(inputs), _valid(inputs, mask_index, z))
                objective = s / max(c, 1) + ridge * maps.penalty()
                grads = torch.autograd.grad(objective, params)
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
            epochs_run += 1
            held = evaluate(back, z_back)
            history.append({"ridge": ridge, "epoch": epoch + 1, "held_back": held})
            if held < best[0]:
                best = (held, maps.state(), ridge, epochs_run)
            if held < best_here - 1e-9:
                best_here, stale = held, 0
            else:
                stale += 1
                if stale >= int(opts["patience"]):
                    break
    maps.load(best[1])
    record = {
        "method": "outputs", "loss": loss,
        "samples": {"fit": sum(_size(i) for i in train), "held_back": sum(_size(i) for i in back)},
        "ridge": best[2], "epochs": best[3], "epochs_run": epochs_run,     # epochs: of the state compiled
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
        "divergence": {"fit": {"before": start_train, "after": evaluate(train, z_train)},
                       "held_back": {"before": start_back, "after": best[0]}},
        "history": history,
    }
    return _rebuilt(plans, maps.fitted()), record
