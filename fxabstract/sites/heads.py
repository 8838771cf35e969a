"""Attention heads as unit groups: a head's output slice, read by the output projection, is a site
whose units are removed a whole head at a time (docs/math.md §1: a site is a value read only by affine
consumers; the output projection is one).

The pattern, in fx (symbolic_trace) or aten (torch.export) spelling:

    q, k, v = projections -> views                                  [B, h, T, dh] each (head_rows.py)
    o = softmax(q @ k^T * scale (+ mask)) @ v                       per head: [B, h, T, dh]
      or F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=...)
    y = o -> transpose -> reshape [B, T, h * dh] -> proj             y is the site, proj the consumer

The projections are three Linears, or one fused Linear(d, 3d) whose output is reshaped and unbound
(timm) or split/chunked in three (GPT-2 style). Replacing the units of head g by constants or affine
maps of the kept heads' units is folded into proj; head g's rows of q, k and v are deleted (from each
third of a fused weight), the head count in every view is rewritten and a split takes the new sizes.
Each head's attention depends on its own q, k, v only, so the fold is exact.

Between the projections and the attention, q and k may pass per-head ops (head_ops.py): rotary
position embeddings (`q * cos + rotate_half(q) * sin`, cos and sin the same for every head) and a
q/k RMSNorm or LayerNorm over head_dim (its weight [dh] shared by the heads). They mix values within
one head only, so a kept head's values are unchanged when other heads are deleted; an operand that
differs per head (a [h, 1, 1] gain, a per-head cos) keeps the site ineligible, the reason naming it.

Grouped-query attention (h query heads on h_kv key/value heads, each k/v head repeated to
G = h / h_kv adjacent query heads: Llama's repeat_kv `x[:, :, None].expand(B, h_kv, G, T, dh)
.reshape(B, h, T, dh)`, `repeat_interleave(G, dim=1)`, SDPA `enable_gqa=True`, or for multi-query
attention `expand(B, h, T, dh)`). Decision: units
are still removed one query head at a time (group = dh): head g's q rows go and its replacement is
folded into proj; k and v keep every kv head some kept query head reads (a SharedPiece deletes a kv
head's rows once all its G query heads are removed), and fold rewrites the repeat into an
index_select of the kept query heads' kv heads (gqa.py); the k/v views take the kept kv head count.
Refused, with a reason naming the node: q and the shared k/v from one fused projection (split or
sliced), query heads sharing a kv head that are not adjacent (k.repeat tiling), a repeat spelled
otherwise than above, an operand of a per-head op that differs per head, a norm over all heads.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .gqa import kv_plan, select_kv_heads
from .head_ops import broadcast_ok, region, within_heads
from .head_rows import (IDENTITY_MODULES, apply_op, chain_input, check_stray_readers, evaluate, head_axis, is_linear,
                        trace_back)
from .layers import narrow, op_name, set_view_shape, shape_of, view_shape
from .site import Context, Piece, Refusal, SharedPiece, Site

SHAPE_OPS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone"}
PER_HEAD_OPS = {"softmax", "_softmax", "dropout", "mul", "div", "truediv", "add", "sub", "masked_fill",
                "masked_fill_", "where", "to", "type", "float", "contiguous", "clone"}
SDPA = "scaled_dot_product_attention"
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def find(ctx: Context, proj: fx.Node) -> Site | None:
    """The head site whose output projection is `proj`, or None when proj is not a Linear reading an
    attention block; Refusal, naming the q/k/v projections, when it is attention but not matched."""
    if proj.op != "call_module" or not isinstance(ctx.gm.get_submodule(proj.target), nn.Linear):
        return None
    return _match(ctx.gm, proj, ctx.calls)


def rewrite(gm: fx.GraphModule, folded: list[tuple[Site, list[int]]]) -> None:
    """Each folded head site's views take the kept head count, in place; grouped-query k and v first
    index the kv heads the kept query heads read (`gqa.select_kv_heads`)."""
    for site, kept in folded:
        if site.head_shapes:
            kv_heads = select_kv_heads(gm, site, kept) if site.repeats else 0
            set_head_count(gm, site, len(kept) // site.group, kv_heads)


def _per_head(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op on the attention scores that acts on each head separately (softmax, scaling, masking,
    dropout: an nn.Dropout or nn.Identity module too)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), IDENTITY_MODULES)
    return op_name(node) in PER_HEAD_OPS


def _attention(gm: fx.GraphModule, node: fx.Node):
    """(q input, k input, v input, attention nodes, k transposed?, why not matched or None) of the
    kernel `node` ends at, or None when node is not attention."""
    if op_name(node) == SDPA:
        bound = dict(zip(SDPA_ARGS, node.args)) | dict(node.kwargs)
        mask, reason = bound.get("attn_mask"), None
        if isinstance(mask, fx.Node) and len(shape_of(mask) or ()) >= 3 and shape_of(mask)[-3] != 1:
            reason = f"the attention mask `{mask.name}` of `{node.name}` differs per head (not handled)"
        gqa = bool(bound.get("enable_gqa"))
        return bound["query"], bound["key"], bound["value"], {node}, False, gqa, reason
    if op_name(node) != "matmul" or len(node.users) != 1:
        return None
    B, h = shape_of(node)[:2]
    probs, v_in = node.args[:2]
    score, reason = probs, None
    for _ in range(12):                                               # back from P to q @ k^T
        if not isinstance(score, fx.Node) or op_name(score) == "matmul" or len(score.users) != 1 \
                or not _per_head(gm, score):
            break
        for other in score.all_input_nodes:
            s = shape_of(other) or ()
            if other is not chain_input(score) and len(s) >= 3 and s[-3] != 1:
                reason = reason or f"`{other.name}` is added to the attention scores per head (not handled)"
        score = chain_input(score)
    if not isinstance(score, fx.Node) or op_name(score) != "matmul" or (shape_of(score) or ())[:2] != (B, h):
        return None
    return score.args[0], score.args[1], v_in, {node, score}, True, False, reason


def _match(gm: fx.GraphModule, proj: fx.Node, calls):
    """The head Site of the attention block proj reads, None when it is not attention; a Refusal
    naming the projections when it is attention but not matched."""
    y = proj.args[0]
    if calls[proj.target] != 1 or len(y.users) != 1 or len(shape_of(y) or ()) != 3:
        return None
    core, merge = y, []
    while op_name(core) in SHAPE_OPS and len(core.users) == 1:       # back from y to the kernel
        merge.append(core)
        core = core.args[0]
    if len(shape_of(core) or ()) != 4:
        return None
    found = _attention(gm, core)
    if found is None:
        return None
    *starts, kernel, k_transposed, gqa, reason = found
    chains, stopped = trace_back(gm, starts)
    modules = sorted({lin.target for lin, _ in chains.values()})
    try:
        return _head_site(gm, proj, calls, y, core, merge, starts, kernel, k_transposed, gqa, chains, modules,
                          reason or stopped)
    except Refusal as refusal:
        raise Refusal(refusal.reason, modules) from None


def _head_site(gm: fx.GraphModule, proj: fx.Node, calls, y: fx.Node, core: fx.Node, merge: list, starts: list,
               kernel: set, k_transposed: bool, gqa: bool, chains: dict, modules: list[str], reason: str | None) -> Site:
    """The head Site once the attention kernel and the projections' chains are found; Refusal if not."""
    if reason:
        raise Refusal(reason)
    _check_projections(gm, chains, calls)
    env = evaluate(gm, chains)
    B, h, T, dh = shape_of(core)
    layout = [(s, _head_rows(s, env[s], k_transposed and i == 1, h, dh, gqa and i > 0)) for i, s in enumerate(starts)]
    G = _query_heads_per_kv_head(layout)                              # 1 unless grouped-query attention
    q_lin = chains[starts[0]][0]
    if G > 1 and any(chains[s][0] is q_lin for s in starts[1:]):
        raise Refusal(f"`{q_lin.target}` projects q and the shared k or v of grouped-query attention (not handled)")
    groups: dict[fx.Node, list[torch.Tensor]] = {}                    # Linear -> rows of each of its heads
    for lin in {chains[s][0] for s in starts}:
        mine = torch.cat([rows for s, rows in layout if chains[s][0] is lin], dim=1)   # [h, rows per head]
        step = 1 if lin is q_lin else G                               # k, v: one kv head per G query heads
        groups[lin] = [torch.unique(mine[j:j + step]) for j in range(0, h, step)]
    for lin, heads in groups.items():
        used = torch.cat(heads).sort().values
        if not torch.equal(used, torch.arange(gm.get_submodule(lin.target).out_features)):
            raise Refusal(f"the heads do not read every row of `{lin.target}` exactly once")
    heads_of = {n: groups[lin] for lin, chain in chains.values() for n in [lin, *chain]}
    inner = {n for node in heads_of if not is_linear(gm, node) and (r := region(gm, node)) for n in r.nodes}
    check_stray_readers(heads_of, kernel | inner, env)
    _check_regions(gm, chains, env, groups)
    repeats, kv_side, inside = [], set(), set()
    if G > 1:                                                         # gqa.py: the repeats fold rewrites
        repeats, kv_side, inside = kv_plan(chains, starts[1:], env, dict(layout), h, dh, G, next(iter(kernel)), gqa)
    shapes = _view_axes(chains, env, groups, skip=inside)
    merged = _merge_axes(merge, core, h, dh)
    kv_shapes = {n.name: shapes.pop(n.name) for n in kv_side if n.name in shapes}
    pieces, splits = [], []
    for i, (s, rows) in ((2, layout[2]), (0, layout[0]), (1, layout[1])):   # v, q, k: the order of the 3-Linear case
        shared = G if i > 0 else 1                                    # query heads reading one k / v head
        rows = rows[::shared]                                         # [h / shared, dh]
        start, lin = int(rows[0, 0]), chains[s][0].target
        if not torch.equal(rows.flatten(), torch.arange(start, start + rows.numel())):
            raise Refusal(f"the rows of `{s.name}` are not one block of `{lin}` (interleaved heads)")
        out_features = gm.get_submodule(lin).out_features
        if shared > 1:      # units j G dh .. (j + 1) G dh (G query heads) read k / v rows j dh .. (j + 1) dh
            pieces += [SharedPiece(lin, j * G * dh, (j + 1) * G * dh, start + j * dh, out_features, G, dh)
                       for j in range(h // G)]
            continue
        pieces.append(Piece(lin, 0, h * dh, start, out_features))
        splits += [Piece(n.name, 0, h * dh) for n in chains[s][1] if op_name(n) == "getitem"
                   and op_name(n.args[0]) in ("split", "chunk", "split_with_sizes", "tensor_split")]
    prefix = _common_prefix(modules + [proj.target])
    site = Site((prefix + "." if prefix else "") + "heads", y.name, [n.name for n in merge], [proj.target], h * dh,
                axis=-1, shape=tuple(shape_of(y)[1:]), pieces=pieces, reads={proj.target: "features"}, group=dh,
                head_shapes=shapes | merged, splits=splits, kv_shapes=kv_shapes, repeats=repeats)
    if proj.target in modules:
        raise Refusal(f"the output projection `{proj.target}` also projects q, k or v")
    return site


def _check_projections(gm: fx.GraphModule, chains: dict, calls) -> None:
    for lin, _ in chains.values():
        if calls[lin.target] != 1:
            raise Refusal(f"the projection `{lin.target}` is called {calls[lin.target]} times (shared weights)")


def _check_regions(gm: fx.GraphModule, chains: dict, env: dict, groups: dict) -> None:
    """Refusal if a per-head op on q or k (rotary, q/k norm: head_ops.py) mixes heads: its cos, sin
    or weight must be the same for every head, and it must mix values within one unit group only."""
    for lin, chain in chains.values():
        for node in chain:
            r = region(gm, node) if node.op != "call_module" or not isinstance(
                gm.get_submodule(node.target), IDENTITY_MODULES) else None
            if r is None:
                continue
            rows = env[r.source]
            for operand in r.operands:
                if not broadcast_ok(rows, operand):
                    raise Refusal(f"`{operand.name}` (read by `{node.name}`) differs per head")
            per_unit = any((shape_of(o) or ())[-1:] not in ((), (1,)) for o in r.operands)   # varies on the last axis
            if (r.mixes or per_unit) and not within_heads(rows, groups[lin]):
                raise Refusal(f"`{node.name}` mixes values of different heads" if r.mixes else
                              f"`{node.name}` reads an operand with one value per unit of several heads")


def _query_heads_per_kv_head(layout) -> int:
    """G: k and v repeat each of h / G heads to G adjacent query heads (grouped-query attention:
    repeat_kv, repeat_interleave, SDPA enable_gqa), 1 without; Refusal if the sharing is not that."""
    found = set()
    for s, rows in layout[1:]:                                       # k, v: [h, dh]
        h = rows.shape[0]
        G = next((g for g in range(h, 0, -1) if h % g == 0 and all(
            torch.equal(rows[i], rows[i - i % g]) for i in range(h))), 1)
        if any(torch.equal(rows[i], rows[j]) for i in range(0, h, G) for j in range(i + G, h)):
            raise Refusal(f"the query heads that share a key/value head through `{s.name}` are not adjacent")
        found.add(G)
    if len(found) != 1:
        raise Refusal("keys and values are shared by different numbers of query heads")
    return found.pop()


def _head_rows(start: fx.Node, t: torch.Tensor, transposed: bool, h: int, dh: int, gqa: bool = False) -> torch.Tensor:
    """[h, dh] producer rows of each head of q, k or v (`start`: [B, h, T, dh]; k^T: [B, h, dh, T]);
    `gqa`: k and v carry h / G heads, each read by G adjacent query heads (SDPA enable_gqa)."""
    t = t.transpose(-2, -1) if transposed else t
    if gqa and t.dim() == 4 and t.shape[1] < h and h % t.shape[1] == 0:
        t = t.repeat_interleave(h // t.shape[1], dim=1)
    if tuple(t.shape[1:2]) + tuple(t.shape[3:]) != (h, dh):
        raise Refusal(f"`{start.name}`: its shape {tuple(t.shape)} is not [batch, {h} heads, positions, {dh}]")
    n = narrow(t)
    if not torch.equal(n, n[:1, :, :1].expand_as(n)):
        raise Refusal(f"`{start.name}`: its heads read other rows at other positions or samples")
    return t[0, :, 0, :]                                              # (not n: a broadcast head axis stays h)


def _view_axes(chains: dict, env: dict, groups: dict, skip: set = frozenset()):
    """{view node: (head axis, positions per head)} on the projections' side (but `skip`: the repeats
    of grouped-query k and v, which fold replaces; a single kv head, always kept); Refusal if one has none."""
    out = {}
    for lin, chain in chains.values():
        for node in chain:
            if node not in skip and len(groups[lin]) > 1 and op_name(node) in (
                    "view", "reshape", "_unsafe_view", "expand"):
                axis = head_axis(env[node], groups[lin])
                if axis is None or len(view_shape(node)) != len(shape_of(node)):
                    raise Refusal(f"the view `{node.name}` does not keep each head on one axis")
                out[node.name] = axis
    return out


def _merge_axes(merge: list[fx.Node], core: fx.Node, h: int, dh: int):
    """{view node: (head axis, positions per head)} from the kernel to proj; Refusal if the heads are not
    merged head-major into proj's features (unit u of head u // dh)."""
    units = {core: torch.arange(h * dh).view(1, h, 1, dh).expand(shape_of(core))}
    heads = list(torch.arange(h * dh).view(h, dh))
    out = {}
    for node in reversed(merge):
        units[node] = apply_op(node, units[node.args[0]])
        if op_name(node) in ("view", "reshape", "_unsafe_view"):
            axis = head_axis(units[node], heads)
            if axis is None or len(view_shape(node)) != len(shape_of(node)):
                raise Refusal(f"the view `{node.name}` does not keep each head on one axis")
            out[node.name] = axis
    y = narrow(units[merge[0]]) if merge else None
    if y is None or tuple(y.shape[:-1]) != (1, 1) or not torch.equal(y.flatten(), torch.arange(h * dh)):
        raise Refusal(f"`{core.name}`'s heads do not reach the output projection as [batch, positions, heads * {dh}]")
    return out


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def set_head_count(gm: fx.GraphModule, site: Site, heads: int, kv_heads: int = 0) -> None:
    """Give every view of a head site its new size on the head axis (heads * positions per head; the
    views of grouped-query k and v: kv_heads), in place; an inferred size (-1) is left as it is."""
    nodes = {n.name: n for n in gm.graph.nodes}
    counts = [(site.head_shapes, heads), (site.kv_shapes, kv_heads)]
    for name, (axis, per_head), count in [(n, a, c) for shapes, c in counts for n, a in shapes.items()]:
        node = nodes[name]
        shape = view_shape(node)
        if shape[axis] == -1:
            continue
        shape[axis] = count * per_head
        set_view_shape(node, shape)
