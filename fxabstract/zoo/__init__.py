"""Reference architectures, written here because torchvision does not import beside torch 2.13.
The tests and benchmarks compile every one of them; `mobilenet_v2()`'s state_dict keys match
torchvision's, so its ImageNet weights load with `load_state_dict`.

    >>> model = zoo.ARCHITECTURES["resnet18"]()        # (factory, input shape) pairs in ZOO
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU6) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> activation: torchvision's Conv2dNormActivation layout."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm (random-weight models:
    a freshly built BatchNorm is the identity in eval mode, which would hide per-channel folding bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


# --------------------------------------------------------------------------- ResNets

class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut; the channels between the two convs are the site."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18 layout (torchvision's names) at any width; `cifar=True` uses a 3x3 stem, no max-pool."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), classes: int = 1000, cifar: bool = False):
        super().__init__()
        stem = widths[0]
        if cifar:
            self.conv1, self.maxpool = nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.Identity()
        else:
            self.conv1, self.maxpool = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stem)
        cin, stages = stem, []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (j == 0 and i > 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(classes: int = 1000, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), tuple(width * m for m in (1, 2, 4, 8)), classes)


def cifar_resnet(classes: int = 10) -> ResNet:
    """A ResNet-20-like CIFAR net: three stages of 16/32/64 channels, 3 blocks each, 32x32 inputs."""
    return ResNet((3, 3, 3), (16, 32, 64), classes, cifar=True)


# --------------------------------------------------------------------------- MobileNetV2

class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> 1x1 projection (+ shortcut); the expansion channels are the site."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn(cin, hidden, 1)] if t != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (same module names, so its state_dict loads)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, classes: int = 1000, width_mult: float = 1.0, last_channel: int = 1280):
        super().__init__()
        cin = int(32 * width_mult)
        last = max(last_channel, int(last_channel * width_mult))
        features = [conv_bn(3, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = int(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(classes)


# --------------------------------------------------------------------------- other CNNs

def vgg_small(classes: int = 10) -> nn.Sequential:
    """VGG-style: conv-bn-relu stacks, max-pools, a two-layer classifier head."""
    cfg, layers, cin = (32, 32, "M", 64, 64, "M", 128, "M"), [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * 4 * 4, 256), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(256, classes))


class Fire(nn.Module):
    """SqueezeNet's fire module: squeeze 1x1, then 1x1 and 3x3 expansions concatenated."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), Fire(32, 8, 32, 32), Fire(64, 8, 32, 32),
                                      nn.MaxPool2d(2), Fire(64, 16, 48, 48))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(96, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class DenseLayer(nn.Module):
    """DenseNet's bottleneck: bn-relu-conv1x1-bn-relu-conv3x3, output concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        h = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return torch.cat([x, h], 1)


class DenseNet(nn.Module):
    def __init__(self, classes: int = 10, growth: int = 12, layers: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        blocks, c = [], 24
        for _ in range(layers):
            blocks.append(DenseLayer(c, growth))
            c += growth
        self.block = nn.Sequential(*blocks)
        self.norm, self.fc = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.norm(self.block(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtBlock(nn.Module):
    """depthwise 7x7 -> LayerNorm (channels last) -> Linear 4x -> GELU -> Linear -> layer scale + shortcut."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-1 * torch.ones(dim))

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes: int = 10, dim: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TemporalConvNet(nn.Module):
    """1-D convolutions over a sequence (no recurrence): conv-bn-relu x3, global pool, Linear."""

    def __init__(self, cin: int = 1, classes: int = 10, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(cin, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Conv1d(width, width, 5, padding=2, dilation=1), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Conv1d(width, 2 * width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                                 nn.Flatten(), nn.Linear(2 * width, classes))

    def forward(self, x):
        return self.net(x)


class LeNet(nn.Module):
    """Conv-pool-conv-pool-flatten-MLP, the classic: the flatten maps a channel to a block of features."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 2 * 2, 64), nn.Linear(64, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class LeNet5(nn.Module):
    """LeCun's LeNet-5 as in Ahmad et al.'s code: [1, 32, 32] -> conv 6 (5x5) -> ReLU -> max-pool 2 ->
    conv 16 (5x5) -> ReLU -> max-pool 2 -> 400 -> 120 -> 84 -> classes, ReLUs between."""

    def __init__(self, classes: int = 10, channels: int = 1):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


class SplitConvNet(nn.Module):
    """A stem conv split unequally into two branches (ReLU -> 3x3 conv; BatchNorm -> depthwise ->
    ReLU -> 1x1 conv) that are summed, then a gated head whose Linear output is sliced in halves
    (a * sigmoid(g)): each branch's piece of the stem is a site, and so are the gated units."""

    def __init__(self, classes: int = 10, sizes: tuple = (24, 40), width: int = 16):
        super().__init__()
        self.sizes = list(sizes)
        self.stem = nn.Conv2d(3, sum(sizes), 3, padding=1)
        self.conv_a = nn.Conv2d(sizes[0], width, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(sizes[1])
        self.dw_b = nn.Conv2d(sizes[1], sizes[1], 3, padding=1, groups=sizes[1])
        self.conv_b = nn.Conv2d(sizes[1], width, 1)
        self.fc1, self.fc2 = nn.Linear(width * 4, 64), nn.Linear(32, classes)

    def forward(self, x):
        a, b = self.stem(x).split(self.sizes, dim=1)
        y = self.conv_a(F.relu(a)) + self.conv_b(F.relu(self.dw_b(self.bn_b(b))))
        h = self.fc1(torch.flatten(F.adaptive_avg_pool2d(F.relu(y), 2), 1))
        return self.fc2(h[:, :32] * torch.sigmoid(h[:, 32:]))


# --------------------------------------------------------------------------- squeeze-and-excitation

class SqueezeExcitation(nn.Module):
    """torchvision's SE: x * gate(fc2(relu(fc1(pool(x))))) with 1x1 convs (MobileNetV3: hardsigmoid)."""

    def __init__(self, c: int, squeeze: int, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.relu, self.gate = nn.ReLU(), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidualSE(nn.Module):
    """MobileNetV3's block: 1x1 expansion -> k x k depthwise -> optional SE -> 1x1 projection (+ shortcut);
    the expansion channels (gated by the SE) are the site."""

    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, act, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn(cin, hidden, 1, act=act)] if hidden != cin else []
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcitation(hidden, max(8, hidden // 4)))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV3Small(nn.Module):
    """MobileNetV3-small's layout (hardswish, SE with hardsigmoid, blocks with and without SE, residual
    adds) at reduced widths: (kernel, expansion, out, SE, activation, stride) per block."""

    SETTINGS = ((3, 16, 16, True, nn.ReLU, 2), (3, 48, 24, False, nn.ReLU, 2), (3, 56, 24, False, nn.ReLU, 1),
                (5, 64, 32, True, nn.Hardswish, 2), (5, 96, 32, True, nn.Hardswish, 1),
                (5, 96, 48, True, nn.Hardswish, 1))

    def __init__(self, classes: int = 10, last_channel: int = 128):
        super().__init__()
        features, cin = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)], 16
        for k, hidden, cout, se, act, stride in self.SETTINGS:
            features.append(InvertedResidualSE(cin, k, hidden, cout, se, act, stride))
            cin = cout
        features.append(conv_bn(cin, 6 * cin, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Linear(6 * cin, last_channel), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(last_channel, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def kaiming_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-normal weights (fan in, ReLU gain) for every conv and Linear, biases zero: with the default init
    the input-dependent part of a deep random net's activations fades below float precision behind the
    BatchNorms' random shifts, and an exactness check on it would check a constant."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def mobilenet_v3_small(classes: int = 10) -> MobileNetV3Small:
    return randomize_batch_norm(kaiming_init(MobileNetV3Small(classes)))


class MBConv(nn.Module):
    """EfficientNet's MBConv: 1x1 expansion -> depthwise -> SE with Linear fc1/fc2 (SiLU, sigmoid) -> 1x1
    projection + shortcut. form "view": the pool flattened, the gate viewed back to [B, C, 1, 1];
    "mean": x.mean over the spatial axes, the gate unsqueezed twice."""

    def __init__(self, c: int, expand: int = 4, squeeze: int = 8, form: str = "view"):
        super().__init__()
        hidden = c * expand
        self.expand = conv_bn(c, hidden, 1, act=nn.SiLU)
        self.dw = conv_bn(hidden, hidden, 3, groups=hidden, act=nn.SiLU)
        self.fc1, self.fc2 = nn.Linear(hidden, squeeze), nn.Linear(squeeze, hidden)
        self.project = conv_bn(hidden, c, 1, act=None)
        self.hidden, self.form = hidden, form

    def forward(self, x):
        h = self.dw(self.expand(x))
        if self.form == "view":
            s = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)                # [B, hidden]
            gate = torch.sigmoid(self.fc2(F.silu(self.fc1(s)))).view(-1, self.hidden, 1, 1)
        else:
            gate = torch.sigmoid(self.fc2(F.silu(self.fc1(h.mean((2, 3)))))).unsqueeze(-1).unsqueeze(-1)
        return x + self.project(h * gate)


class EfficientNetBlock(nn.Module):
    """A stem, two MBConv blocks (one of each SE form), global pool and a Linear head."""

    def __init__(self, classes: int = 10, c: int = 16):
        super().__init__()
        self.stem = conv_bn(3, c, 3, 2, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(c, form="view"), MBConv(c, form="mean"))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def efficientnet_block(classes: int = 10) -> EfficientNetBlock:
    return randomize_batch_norm(kaiming_init(EfficientNetBlock(classes)))


class ResNeXtBottleneck(nn.Module):
    """ResNeXt's bottleneck: 1x1 conv -> grouped 3x3 conv (`groups` paths) -> 1x1 conv, plus the skip."""

    def __init__(self, channels: int, width: int, groups: int):
        super().__init__()
        self.conv1 = conv_bn(channels, width, 1, act=nn.ReLU)
        self.conv2 = conv_bn(width, width, 3, groups=groups, act=nn.ReLU)
        self.conv3 = conv_bn(width, channels, 1, act=None)

    def forward(self, x):
        return F.relu(x + self.conv3(self.conv2(self.conv1(x))))


class ResNeXt(nn.Module):
    """A small ResNeXt (Xie et al. 2017): a stem and two grouped bottlenecks. Every hidden channel inside a
    block is next to a grouped conv: those sites lose as many channels from every group."""

    def __init__(self, classes: int = 10, channels: int = 32, width: int = 64, groups: int = 8):
        super().__init__()
        self.stem = conv_bn(3, channels, 3, act=nn.ReLU)
        self.blocks = nn.Sequential(*(ResNeXtBottleneck(channels, width, groups) for _ in range(2)))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))
