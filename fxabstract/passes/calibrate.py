"""The one pass over the calibration data: every batch feeds the moments and curvature of every site.

One pass because calibration may be a generator, seen once, and is never held in memory whole.
For each batch we run the graph once under `torch.func.vjp`, with zero perturbations added at each site
(`SiteRunner`), so that one vmapped backward gives every site's per-sample factors at once.

    >>> stats = calibrate(gm, sites, [x1, x2], divergence="logit-mse")
    >>> stats.moments["0"].mean, stats.curvature["0"].sh    # per site, float64 sums
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..data import bind, first_tensor, logits, select_output, split_batch
from ..errors import CalibrationError
from ..sites import Site
from .curvature import PACKED_PROBES, Curvature, output_vectors
from .moments import Moments
from .sequential import blockwise_vjp, blocks_at_sites


def broadcast(e: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """[B, d] -> a view that broadcasts over a site value of `rank` with its units on `axis`."""
    if rank == 2:
        return e
    if axis == 1:
        return e.reshape(*e.shape, *([1] * (rank - 2)))
    return e.reshape(e.shape[0], *([1] * (rank - 2)), e.shape[1])


def units_last(a: torch.Tensor, axis: int) -> torch.Tensor:
    """[B, ...] site value -> [B, positions, d]: every position (pixel, token) of a sample."""
    a = a.movedim(axis, -1) if axis == 1 else a
    return a.reshape(a.shape[0], -1, a.shape[-1])


def site_rows(value: torch.Tensor, axis: int, valid: torch.Tensor | None) -> torch.Tensor:
    """A site value -> [n, d]: every real position of every sample (`valid` [B, T] bool, or None: all; it
    applies where the site has T positions per sample, a token's units)."""
    u = units_last(value, axis)
    return u.reshape(-1, u.shape[-1]) if valid is None or u.shape[1] != valid.shape[1] else u[valid]


class SiteRunner(fx.Interpreter):
    """Runs the graph, records each site's value and perturbs it: a + shift + a * scale (+ pos), with
    shift, scale: [B, d] shared by every position, so that d z / d shift = sum over positions of
    J (the Jacobian of a unit held constant) and d z / d scale = sum over positions of J a; the optional
    pos has the site value's shape, so d z / d pos = J at each position."""

    def __init__(self, gm: fx.GraphModule, sites: list[Site]):
        super().__init__(gm)
        self.axis = {s.node: s.axis for s in sites}
        self.recorded = set(self.axis) | {b.node for s in sites for b in s.branches}   # SE branches: never perturbed
        self.eps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.acts: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.recorded:
            self.acts[n.name] = out.detach()
        if n.name in self.axis:
            if n.name in self.eps:
                shift, scale, *pos = self.eps[n.name]
                ax = self.axis[n.name]
                out = out + broadcast(shift, out.dim(), ax) + out.detach() * broadcast(scale, out.dim(), ax)
                if pos:
                    out = out + pos[0]
        return out


@dataclass
class Statistics:
    """What calibration learned, per site name."""

    moments: dict[str, Moments]
    curvature: dict[str, Curvature]
    divergence: str
    method: str                      # "exact" or "hutchinson"
    probes: int | None
    outputs: int                     # o, the flattened output width
    reservoir: list = field(default_factory=list)   # [(bound inputs, targets)]: the first samples, bounded
    nonfinite_outputs: int = 0       # samples whose outputs held NaN or inf (overflow): checks.py refuses them
    fit_samples: int = 0             # samples of forward-only fit data added to `moments` (`add_fit_data`)
    branch_moments: dict[str, Moments] = field(default_factory=dict)   # per SE branch name: plain moments
    diagonal: dict[str, str] = field(default_factory=dict)   # sites kept to O(d) statistics: why (memory)
    fit_reservoir: list = field(default_factory=list)   # [(bound inputs, None)]: the first fit-data samples

    def __add__(self, other: "Statistics") -> "Statistics":
        return Statistics({k: v + other.moments[k] for k, v in self.moments.items()},
                          {k: v + other.curvature[k] for k, v in self.curvature.items()},
                          self.divergence, self.method, self.probes, self.outputs, self.reservoir,
                          self.nonfinite_outputs + other.nonfinite_outputs, self.fit_samples + other.fit_samples,
                          {k: v + other.branch_moments[k] for k, v in self.branch_moments.items()}, self.diagonal,
                          self.fit_reservoir)


def _on_device(batch, device) -> tuple[tuple, dict, object]:
    """(args, kwargs, targets) of a batch, its input tensors moved to `device`."""
    args, kwargs, targets = split_batch(batch)
    return (tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args),
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}, targets)


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes of a batch's input tensors but their batch axis: batches with equal keys have equal site
    shapes."""
    return tuple(tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else None for v in (*args, *kwargs.values()))


def _valid_positions(kwargs: dict, mask: str | None, batch: int) -> torch.Tensor | None:
    """[B, T] bool: the real positions by the keyword input `mask` (nonzero = real), or None."""
    if mask is None or mask not in kwargs:
        return None
    m = kwargs[mask]
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != batch:
        raise CalibrationError(f"the padding mask `{mask}` must be a [batch, positions] tensor, got "
                               f"{list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}; pass mask=None "
                               "to use every position")
    return m != 0


@torch.no_grad()
def _site_shapes(runner: SiteRunner, sites: list[Site], inputs: list, key: tuple, first: tuple | None,
                 cache: dict, index: int) -> dict[str, tuple]:
    """Per site node: its value's shape without the batch axis for this batch (sites.annotate_shapes saw
    the first batch; a batch of other input shapes, a longer sequence, is run once to see its own, and a
    CalibrationError names batch `index` when the model cannot run it)."""
    if first is None or key == first:
        return {s.node: s.shape for s in sites}
    if key not in cache:
        runner.eps, runner.acts = {}, {}
        try:
            runner.run(*inputs)
        except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:   # refused sizes (an
            # AssertionError: a guard of a module captured through torch.export on the first batch)
            sizes = ", ".join(str(list(v.shape)) for v in inputs if isinstance(v, torch.Tensor))
            raise CalibrationError(
                f"calibration batch {index} (inputs {sizes}) has sizes the model cannot run, though it ran the first "
                f"batch ({str(exc).strip().splitlines()[0]}); give every batch sizes the model takes") from None
        cache[key] = {s.node: tuple(runner.acts[s.node].shape[1:]) for s in sites}
    return cache[key]


def calibrate(gm: fx.GraphModule, sites: list[Site], calibration, divergence: str = "logit-mse",
              method: str = "auto", probes: int = 16, matrices: bool | str = True, seed: int = 0,
              progress: bool = False, reservoir: int = 512, backward_elements: int = 2**27,
              sequential: bool = False, output=None, mask=None) -> Statistics:
    """Stream `calibration` once; return per-site Moments and Curvature.

    method: "exact" (one VJP per output), "hutchinson" (`probes` VJPs), "auto" (exact when the output
      has at most `probes` values, where it costs no more than probing; Hutchinson otherwise).
    matrices: also accumulate the d x d sums: True, every one (joint selection and affine replacement);
      "joint", only the curvature sums of joint selection with constant replacement (three d x d sums
      per site instead of seven, and no per-position backward); or a dict {site name: level}.
    reservoir: keep the first this many samples (inputs and targets) for measuring risks later.
    backward_elements: how many site-activation elements the vmapped backward may hold at once
      (a proxy for its memory); the probes are processed in chunks that fit.
    sequential: back-propagate one block of the graph at a time (passes/sequential.py): same result.
    output: which of the model's outputs the metric reads (`data.select_output`).
    mask: the name of a keyword input [B, T] whose zeros mark padded positions (`attention_mask`), or None.
      Padded positions enter no statistic: at every site with T positions per sample (a token's units)
      their activations are left out of the moments and the curvature sums, and an output with T positions
      has no metric there (its output vectors are zero). Batches may differ in T.
    """
    levels = matrices if isinstance(matrices, dict) else {s.name: matrices for s in sites}
    per_position = any(levels.get(s.name) is True for s in sites)   # a full-shape perturbation for the affine sums
    runner = SiteRunner(gm, sites)
    generator = torch.Generator().manual_seed(seed)
    params = next(gm.parameters())
    moments: dict[str, Moments] = {}
    curvature: dict[str, Curvature] = {}
    branch_moments: dict[str, Moments] = {}
    started = False
    chosen, outputs = method, 0
    first_key, shape_cache = None, {}      # the first batch's input shapes; site shapes per input shape
    kept_samples: list = []          # the reservoir
    nonfinite = 0
    n_kept = 0
    for index, batch in enumerate(tqdm(calibration, desc="calibrate", unit="batch", disable=not progress,
                                       leave=False)):
        args, kwargs, targets = _on_device(batch, params.device)
        x = first_tensor(args, kwargs)
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise CalibrationError("calibration inputs contain NaN or inf; clean or drop those samples")
        if divergence == "ce" and targets is None:
            raise CalibrationError("score 'ce' needs labels: give calibration batches as (inputs, targets) pairs")
        inputs = bind(gm, args, kwargs)
        valid = _valid_positions(kwargs, mask, x.shape[0])                         # [B, T] bool or None
        if not started:  # the first batch fixes the output width and the curvature method
            with torch.no_grad():
                runner.eps = {}
                try:
                    out = logits(runner.run(*inputs), output)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise CalibrationError(
                        f"the model cannot run on the first calibration batch ({str(exc).strip().splitlines()[0]}); "
                        "give inputs of the shape and dtype the model takes") from None
            started = True
            first_key = shape_key(args, kwargs)
            outputs = out.shape[1]
            chosen = ("exact" if outputs <= probes else "hutchinson") if method == "auto" else method
            for s in sites:
                moments[s.name] = Moments.empty(s.n_units, levels.get(s.name) is True, params.device)
                curvature[s.name] = Curvature.empty(s.n_units, divergence == "ce", levels.get(s.name, False),
                                                    params.device)
                for b in s.branches:
                    branch_moments[b.name] = Moments.empty(b.n_units, levels.get(s.name) is True, params.device)
        B = x.shape[0]
        take = min(B, reservoir - n_kept)
        if take > 0:
            n_kept += take
            kept_samples.append(([v[:take] if isinstance(v, torch.Tensor) and v.shape[:1] == (B,) else v
                                  for v in inputs], None if targets is None else targets[:take]))
        zero = lambda s: torch.zeros(B, s.n_units, dtype=params.dtype, device=params.device)  # noqa: E731
        shapes = _site_shapes(runner, sites, inputs, shape_key(args, kwargs), first_key, shape_cache, index)
        full = lambda s: torch.zeros(B, *shapes[s.node], dtype=params.dtype, device=params.device)  # noqa: E731
        eps0 = {s.node: (zero(s), zero(s)) + ((full(s),) if levels.get(s.name) is True else ()) for s in sites}
        raw_shape = []

        def forward(eps):
            runner.eps = eps
            out = select_output(runner.run(*inputs), output)
            raw_shape[:] = [out.shape]
            return out.reshape(out.shape[0], -1) if out.dim() else out.reshape(1, 1), dict(runner.acts)

        if sequential:  # the same VJP, one block of the graph at a time (passes/sequential.py)
            z, vjp_fn, acts = blockwise_vjp(runner, blocks_at_sites(gm, sites), inputs, eps0, output)
            vmapped = lambda V: vjp_fn(V, batched=True)  # noqa: E731
        else:
            z, vjp_fn, acts = torch.func.vjp(forward, eps0, has_aux=True)
            vmapped = torch.func.vmap(vjp_fn)
        nonfinite += int((~torch.isfinite(z.detach())).any(-1).sum())
        zd = z.detach()
        r = zd.shape[1] if chosen == "exact" else probes
        lazy = chosen == "hutchinson" and r * zd.numel() > PACKED_PROBES   # one probe at a time: a large output

        def vectors(draw=None):
            """[r or draw, B, o] output vectors, zero at padded positions."""
            V = output_vectors(zd, divergence, chosen, probes, generator, draw)
            if valid is not None and raw_shape and len(raw_shape[0]) >= 3 and raw_shape[0][1] == valid.shape[1]:
                V = (V.view(V.shape[0], *raw_shape[0]) * broadcast(valid.to(V.dtype), len(raw_shape[0]), 1)[None]
                     ).reshape(V.shape)                                               # no metric at padding
            return V

        # torch.func's vjp_fn builds a graph of the backward itself unless under no_grad (16 probes:
        # 2.8 GB vs 0.8 GB on MobileNetV2 at 160 px, B = 4); a vmapped backward holds r copies of every
        # activation gradient (in sequential mode, of one block's), so past `backward_elements` the r
        # backward passes run one by one
        held = (max if sequential else sum)(a.numel() for a in acts.values()) * (2 if per_position else 1)
        with torch.no_grad(), warnings.catch_warnings():   # vmap's "no batching rule" notes are not the user's
            warnings.filterwarnings("ignore", message=".*batching rule.*", category=UserWarning)
            if r * held <= backward_elements and (sequential or not lazy):   # sequential: a block's forward
                (U_all,) = vmapped(vectors())  # site -> ([r, B, d] sum J, [r, B, d] sum J a[, [r, B, ...] per position])
            else:                              # is re-run per backward, so batch the probes there if they fit
                parts = [vjp_fn(vectors(1)[0])[0] for _ in range(r)] if lazy else [vjp_fn(v)[0] for v in vectors()]
                U_all = {k: tuple(torch.stack([p[k][j] for p in parts]) for j in range(len(parts[0][k])))
                         for k in parts[0]}
        g_all = None
        if divergence == "ce":
            if targets.numel() != B or targets.min() < 0 or targets.max() >= z.shape[1]:
                raise CalibrationError(f"score 'ce' needs one class index in 0..{z.shape[1] - 1} per sample; "
                                       "check the calibration targets")
            y = torch.nn.functional.one_hot(targets.to(z.device).long().reshape(B), z.shape[1]).to(z)
            with torch.no_grad():
                (g_all,) = vjp_fn(torch.softmax(z.detach(), -1) - y)                     # site -> ([B, d], [B, d])
        for s in sites:
            a = units_last(acts[s.node], s.axis)                                      # [B, positions, d]
            real = valid if valid is not None and a.shape[1] == valid.shape[1] else None   # a token's units
            moments[s.name].update(a.reshape(-1, s.n_units) if real is None else a[real])
            Us, Ua, *Up = U_all[s.node]
            Up = [units_last(u.flatten(0, 1), s.axis).unflatten(0, u.shape[:2]) for u in Up]   # [r, B, positions, d]
            grads = g_all[s.node][:2] if g_all is not None else (None, None)
            curvature[s.name].update(a, Us, Ua, *grads, *(Up or [None]), valid=real)
        _update_branches(sites, branch_moments, acts)
    if not moments:
        raise CalibrationError("the calibration data is empty; pass at least one batch of inputs")
    for c in curvature.values():
        c.flush()
    return Statistics(moments, curvature, divergence, chosen, probes if chosen == "hutchinson" else None, outputs,
                      kept_samples, nonfinite, branch_moments=branch_moments)


def _update_branches(sites: list[Site], branch_moments: dict, acts: dict) -> None:
    """Plain moments of each SE branch value (what fc1 reads: the squeezed x), per position."""
    for s in sites:
        for b in s.branches:
            branch_moments[b.name].update(units_last(acts[b.node], b.axis).reshape(-1, b.n_units))


@torch.no_grad()
def add_fit_data(gm: fx.GraphModule, sites: list[Site], stats: Statistics, batches, progress: bool = False,
                 mask: str | None = None, keep: int = 4096) -> Statistics:
    """`stats` with the plain moments of `batches` added to every site's: a forward pass only, far cheaper
    per sample than the curvature pass, so affine replacements can be fitted on much more data. The
    affine fit then uses these plain moments (calibration + fit data) instead of the curvature-weighted ones
    of the calibration data alone (passes/select.py `fit`); curvature, scores and orders are unchanged.
    mask: as for `calibrate` (padded positions enter no moment). Empty fit data is a CalibrationError.
    keep: the first this many fit-data samples are kept (`fit_reservoir`) for the fits that run the
      network (passes/refit.py: fit="sequential" or "outputs")."""
    runner = SiteRunner(gm, sites)
    params = next(gm.parameters())
    moments = {name: Moments(m.n, m.s1.clone(), m.s2.clone()) for name, m in stats.moments.items()}
    branch_moments = {name: Moments(m.n, m.s1.clone(), m.s2.clone()) for name, m in stats.branch_moments.items()}
    samples = 0
    kept = list(stats.fit_reservoir)
    for batch in tqdm(batches, desc="fit data", unit="batch", disable=not progress, leave=False):
        args, kwargs, _ = _on_device(batch, params.device)
        runner.eps, runner.acts = {}, {}
        inputs = bind(gm, args, kwargs)
        runner.run(*inputs)
        B = first_tensor(args, kwargs).shape[0]
        take = min(B, keep - samples)
        if take > 0:
            kept.append(([v[:take] if isinstance(v, torch.Tensor) and v.shape[:1] == (B,) else v for v in inputs], None))
        samples += B
        valid = _valid_positions(kwargs, mask, first_tensor(args, kwargs).shape[0])
        for s in sites:
            moments[s.name].update(site_rows(runner.acts[s.node], s.axis, valid))
        _update_branches(sites, branch_moments, runner.acts)
    if not samples:
        raise CalibrationError("fit_data holds no samples (an exhausted generator, or an empty list?); pass "
                               "batches of inputs, or fit_data=None")
    return dataclasses.replace(stats, moments=moments, fit_samples=stats.fit_samples + samples,
                               branch_moments=branch_moments, fit_reservoir=kept)
