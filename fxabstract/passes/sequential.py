"""Sequential calibration: the same per-sample curvature as the whole-model pass, holding one block's
activations at a time, for models whose whole-graph backward does not fit.

The graph's nodes are cut into blocks, one ending at each site. Per batch, a forward sweep runs the
blocks in order without autograd and keeps only the values that cross a cut (block boundaries: the
site values, residual streams). The backward sweep then goes from the last block to the first: it
re-runs one block under `torch.func.vjp` from its saved boundary inputs, pulls the cotangents of its
outputs back to its inputs and to the perturbations of its sites, and frees the block. By the chain
rule that is the whole-model VJP, so calibration gives the same statistics (up to float rounding).

    >>> z, vjp_fn, acts = blockwise_vjp(runner, blocks_at_sites(gm, sites), inputs, eps0)
    >>> (cotangents,) = vjp_fn(V, batched=True)   # = torch.func.vmap(vjp_fn)(V) of the whole-graph VJP
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..data import logits


def blocks_at_sites(gm: fx.GraphModule, sites) -> list[list[fx.Node]]:
    """The graph's computing nodes in order, cut after each site node (the last block ends at the output)."""
    cuts = {s.node for s in sites}
    blocks, current = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        current.append(node)
        if node.name in cuts:
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def _differentiable(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def blockwise_vjp(runner, blocks: list[list[fx.Node]], inputs: list, eps0: dict, output=None):
    """(z [B, o], vjp_fn, site activations) like torch.func.vjp(forward, eps0, has_aux=True), block by block.

    runner: a calibrate.SiteRunner over the graph (adds eps at site nodes, records activations); output:
    which of the model's outputs z is (`data.select_output`)."""
    graph = blocks[0][0].graph
    block_of = {n: k for k, block in enumerate(blocks) for n in block}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    reads = [sorted({a for n in block for a in n.all_input_nodes if block_of.get(a) != k}, key=str)
             for k, block in enumerate(blocks)]           # boundary inputs of each block
    crossing = {a for r in reads for a in r}
    saved = dict(zip(placeholders, inputs))                # boundary values, kept for the backward sweep
    runner.eps, runner.acts = {}, {}
    with torch.no_grad():                                   # forward sweep: one block's values at a time
        for k, block in enumerate(blocks):
            runner.env = {a: saved[a] for a in reads[k]}
            for node in block:
                runner.env[node] = runner.run_node(node)
            saved.update({n: runner.env[n] for n in block if n in crossing})
    z = logits(runner.env[blocks[-1][-1]], output)
    runner.env = {}
    acts = dict(runner.acts)

    def vjp_fn(V, batched: bool = False):
        """Cotangents of the site perturbations for V: [B, o], or [r, B, o] when batched (vmapped per block)."""
        cotangents, site_grads = {}, {}
        for k in reversed(range(len(blocks))):
            block = blocks[k]
            diff_in = [a for a in reads[k] if a not in placeholders and _differentiable(saved[a])]
            outs = [n for n in block if n in crossing and _differentiable(saved[n])]
            eps_k = {n.name: eps0[n.name] for n in block if n.name in eps0}

            def run(eps, xs, k=k, block=block, diff_in=diff_in, outs=outs):
                runner.eps, runner.acts = eps, {}          # the activations were recorded in the forward sweep
                runner.env = {**{a: saved[a] for a in reads[k]}, **dict(zip(diff_in, xs))}
                for node in block:
                    runner.env[node] = runner.run_node(node)
                result = tuple(runner.env[n] for n in outs)
                return result + ((logits(runner.env[block[-1]], output),) if block[-1].op == "output" else ())

            primals, pull = torch.func.vjp(run, eps_k, tuple(saved[a] for a in diff_in))
            zero = (lambda p: p.new_zeros(()).expand(V.shape[0], *p.shape)) if batched else torch.zeros_like
            wanted = tuple(cotangents.pop(n) if n in cotangents else zero(p) for n, p in zip(outs, primals))
            if block[-1].op == "output":
                wanted = wanted + (V,)
            g_eps, g_in = torch.func.vmap(pull)(wanted) if batched else pull(wanted)
            site_grads.update({name: tuple(t.detach() for t in v) for name, v in g_eps.items()})
            for a, g in zip(diff_in, g_in):   # detached: a cotangent's history would keep its block alive
                cotangents[a] = cotangents[a] + g.detach() if a in cotangents else g.detach()
            del primals, pull, wanted, g_in                   # free this block before re-running the next
            runner.env = {}
        runner.eps = {}
        return (site_grads,)

    return z, vjp_fn, acts
