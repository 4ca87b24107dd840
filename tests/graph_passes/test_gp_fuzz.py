"""Property-based fuzzing of graph_passes: hypothesis assembles small random networks from the
constructs graph_passes handles, prunes a random choice of their channels, and checks that

- tracing leaves the model as it was (same outputs);
- ``ModelSpeedup`` computes what the masked model (``masked_copy``) computes;
- the pruned model traces again (``channel_groups`` succeeds on it);
- it has fewer parameters when a channel was removed, as many when none was.

The networks (see :func:`networks`) start from an image ``(B, 3, H, W)`` or from tokens
``(B, N, 6)`` and a stem (a plain conv or a Linear: blocks straight on the input find its channels fixed),
followed by random blocks. Image blocks: plain, grouped and depthwise convs (with or without bias,
followed by an activation); BatchNorm2d, GroupNorm (one group, several, one per channel) and
LayerNorm over the channels of an NCHW tensor (permute, norm, permute back), each as a module or
through its torch.nn.functional form; a residual conv branch; SE gating (global pool, a small MLP
of 1x1 convs or of Linear layers, sigmoid, multiply); a residual around 1-3 random inner blocks
brought back to the input's width by a 1x1 conv; concat of two branches or of the input and a
branch; chunk/split (gated, summed, a conv on one part, the parts swapped) and channel shuffle
(reshape/transpose/reshape); max/avg/adaptive pooling. Then, optionally, flattening to tokens
``(B, H*W, C)`` (flatten+transpose or permute+reshape). Token blocks: Linear, LayerNorm (module or
F.layer_norm), a residual MLP (plain or GLU-gated via chunk), token mixing (MLP-Mixer: a Linear
over the token axis between transposes), residual multi-head attention (timm-style qkv Linear,
reshape to heads, permute, unbind, or separate q/k/v Linear layers viewed to heads and transposed;
then explicit softmax(q @ k^T * scale) @ v or ``F.scaled_dot_product_attention``; the heads merged
back with -1, with C read from the input's shape, or with a constant). Heads: global mean, first
token, or flatten(1) / reshape(B, -1) (a Linear reading C*H*W or N*C inputs).

All of these are supported by graph_passes (some pin channels, which the property covers as
well): the generator builds nothing graph_passes refuses by design, so any GraphPassError here
is a failure. Found by the slow run and fixed: a token-mixing Linear's bias made removed channels
non-zero before a LayerNorm, whose exact statistics count them as zeros; the analysis now tracks
where removed channels stay zero and pins the channels of such a norm (regression tests:
test_gp_layers' test_exact_norm_after_an_op_that_makes_removed_channels_non_zero, test_gp_ops'
test_sum_over_channels_after_sigmoid); the generator keeps building it.

The keep vectors come from :func:`graph_passes.random_keep`, applied to a random non-empty subset
of the prunable groups of two channels or more, each with a random count of removed channels
(1 .. size-1, so one channel at least stays) and a random seed. The default test runs 100
derandomized examples; the slow one 1,000. ``--hypothesis-show-statistics`` lists how often each
construct was drawn.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import graph_passes as gp
from _gp_helpers import assert_same, n_params, outputs

BATCH = 2
OUT = 5  # features of every network's output
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "none": nn.Identity}
WIDTHS = (2, 3, 4, 6, 8)


def _randomize_norm(norm: nn.Module) -> None:
    """Affine parameters and running statistics away from their identity defaults, so that a
    wrongly kept or dropped norm channel shows in the outputs."""
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-0.5, 0.5)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)


# ---------------------------------------------------------------------------------------------
# image blocks: (B, C, H, W) -> (B, C', H', W')

class Conv(nn.Module):
    """Conv2d (plain, grouped or depthwise by ``groups``) and an activation."""

    def __init__(self, c_in: int, c_out: int, k: int, groups: int, bias: bool, act: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=bias)
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.conv(x))


class Norm2d(nn.Module):
    """BatchNorm2d, GroupNorm(``groups``) or a LayerNorm over the channels of NCHW (ConvNeXt);
    with ``functional`` the same through F.batch_norm / F.group_norm / F.layer_norm."""

    def __init__(self, c: int, kind: str, groups: int, functional: bool) -> None:
        super().__init__()
        self.kind, self.groups, self.functional, self.c = kind, groups, functional, c
        self.norm = nn.BatchNorm2d(c) if kind == "bn" else nn.GroupNorm(groups, c) if kind == "gn" else nn.LayerNorm(c)
        _randomize_norm(self.norm)

    def forward(self, x):
        n = self.norm
        if self.kind == "ln":
            y = x.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (self.c,), n.weight, n.bias, n.eps) if self.functional else n(y)
            return y.permute(0, 3, 1, 2)
        if not self.functional:
            return n(x)
        if self.kind == "bn":
            return F.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        return F.group_norm(x, self.groups, n.weight, n.bias, n.eps)


class Residual(nn.Module):
    """x + conv(act(bn(conv(x)))): a bottleneck branch added to its input."""

    def __init__(self, c: int, hidden: int, k: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, hidden, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, c, 1)
        _randomize_norm(self.bn)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn(self.conv1(x))))


class ResidualBlocks(nn.Module):
    """x + conv1x1(blocks(x)): a residual around random inner blocks that keep the side length,
    their width brought back to the input's by a 1x1 conv."""

    def __init__(self, c: int, hw: int, inner: tuple) -> None:
        super().__init__()
        self.blocks, c_inner, _ = _image_modules(c, hw, inner)
        self.back = nn.Conv2d(c_inner, c, 1)

    def forward(self, x):
        return x + self.back(self.blocks(x))


class SqueezeExcite(nn.Module):
    """Global pool -> small MLP -> sigmoid -> multiply. ``style``: 'conv' (1x1 convs on the kept
    1x1 map), 'linear' (Linear layers, indexed back to 4-D) or 'view' (Linear layers, viewed back
    with B and C read from the input's shape)."""

    def __init__(self, c: int, hidden: int, style: str) -> None:
        super().__init__()
        self.style = style
        if style == "conv":
            self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        if self.style == "conv":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        elif self.style == "linear":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))[:, :, None, None]
        else:
            b, c = x.shape[0], x.shape[1]
            s = torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean(dim=(2, 3)))))).view(b, c, 1, 1)
        return x * s


class Concat(nn.Module):
    """cat of two conv branches on the channels, or of the input and one branch (DenseNet)."""

    def __init__(self, c: int, c1: int, c2: int, dense: bool) -> None:
        super().__init__()
        self.dense = dense
        self.a = None if dense else nn.Conv2d(c, c1, 1)
        self.b = nn.Conv2d(c, c2, 3, padding=1)

    def forward(self, x):
        first = x if self.a is None else self.a(x)
        return torch.cat([first, F.relu(self.b(x))], dim=1)


class Split(nn.Module):
    """Channel split constructs. 'glu': chunk in two, a * sigmoid(b); 'sum': chunk in two, a + b;
    'conv': torch.split(x, sizes), a conv on the first part, cat with the second; 'swap':
    x.split(sizes), cat in reverse order; 'shuffle': channel shuffle through a 5-D reshape."""

    def __init__(self, c: int, mode: str, first: int, c_conv: int, shuffle_groups: int) -> None:
        super().__init__()
        self.mode, self.sizes, self.shuffle_groups = mode, [first, c - first], shuffle_groups
        self.conv = nn.Conv2d(first, c_conv, 3, padding=1) if mode == "conv" else None

    def forward(self, x):
        if self.mode == "glu":
            a, b = x.chunk(2, dim=1)
            return a * torch.sigmoid(b)
        if self.mode == "sum":
            a, b = torch.chunk(x, 2, 1)
            return a + b
        if self.mode == "conv":
            a, b = torch.split(x, self.sizes, dim=1)
            return torch.cat((self.conv(a), b), dim=1)
        if self.mode == "swap":
            a, b = x.split(self.sizes, 1)
            return torch.cat([b, a], 1)
        B, C, H, W = x.shape
        g = self.shuffle_groups
        return x.reshape(B, g, C // g, H, W).transpose(1, 2).reshape(B, C, H, W)


class Pool(nn.Module):
    """2x2 max or average pooling, adaptive average pooling to 2x2, or F.max_pool2d 3x3 stride 1
    ('max3')."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        pools = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d, "adaptive": nn.AdaptiveAvgPool2d}
        self.pool = pools[kind](2) if kind in pools else None

    def forward(self, x):
        if self.pool is None:
            return F.max_pool2d(x, 3, stride=1, padding=1)
        return self.pool(x)


class ToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def forward(self, x):
        if self.style == "flatten":
            return x.flatten(2).transpose(1, 2)
        B, C = x.shape[:2]
        return x.permute(0, 2, 3, 1).reshape(B, -1, C)


# ---------------------------------------------------------------------------------------------
# token blocks: (B, N, C) -> (B, N, C')

class TokenLinear(nn.Module):
    def __init__(self, c_in: int, c_out: int, act: str) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.fc(x))


class TokenNorm(nn.Module):
    """LayerNorm over the tokens' channels, as a module or through F.layer_norm."""

    def __init__(self, c: int, functional: bool) -> None:
        super().__init__()
        self.functional, self.c = functional, c
        self.norm = nn.LayerNorm(c)
        _randomize_norm(self.norm)

    def forward(self, x):
        if self.functional:
            return F.layer_norm(x, (self.c,), self.norm.weight, self.norm.bias, self.norm.eps)
        return self.norm(x)


class Mlp(nn.Module):
    """x + fc2(act(fc1(norm(x)))), or with ``glu`` fc1 makes two halves: a * gelu(b)."""

    def __init__(self, c: int, hidden: int, glu: bool) -> None:
        super().__init__()
        self.glu = glu
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * hidden if glu else hidden)
        self.fc2 = nn.Linear(hidden, c)
        _randomize_norm(self.norm)

    def forward(self, x):
        h = self.fc1(self.norm(x))
        if self.glu:
            a, b = h.chunk(2, dim=-1)
            h = a * F.gelu(b)
        else:
            h = F.gelu(h)
        return x + self.fc2(h)


class Attention(nn.Module):
    """x + proj(attention(norm(x))), timm-style: one qkv Linear reshaped to (3, B, heads, N, d),
    or (``fused`` False) three Linear layers each reshaped to (B, N, heads, d) and transposed.
    ``sdpa``: F.scaled_dot_product_attention, else explicit softmax. ``merge``: how the heads are
    merged back: 'minus1' (reshape(B, N, -1)), 'shape' (C of the input's shape, only when the
    attention width equals the stream's) or 'const' (the width as a Python int)."""

    def __init__(self, c: int, heads: int, head_dim: int, sdpa: bool, merge: str, fused: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.sdpa, self.merge, self.fused = heads, head_dim, sdpa, merge, fused
        self.scale = head_dim ** -0.5
        self.norm = nn.LayerNorm(c)
        if fused:
            self.qkv = nn.Linear(c, 3 * heads * head_dim)
        else:
            self.q, self.k, self.v = (nn.Linear(c, heads * head_dim) for _ in range(3))
        self.proj = nn.Linear(heads * head_dim, c)
        _randomize_norm(self.norm)

    def forward(self, x):
        B, N, C = x.shape
        h = self.norm(x)
        if self.fused:
            q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (f(h).view(B, N, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        y = y.transpose(1, 2)
        if self.merge == "minus1":
            y = y.reshape(B, N, -1)
        elif self.merge == "shape":
            y = y.reshape(B, N, C)
        else:
            y = y.reshape(B, N, self.heads * self.head_dim)
        return x + self.proj(y)


class TokenMixer(nn.Module):
    """MLP-Mixer: x + a Linear across the tokens (transpose, Linear over N, transpose back)."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mix = nn.Linear(n, n)
        _randomize_norm(self.norm)

    def forward(self, x):
        return x + self.mix(self.norm(x).transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# heads: -> (B, OUT)

class Head(nn.Module):
    """'mean' (global mean over space or tokens), 'first' (first token), 'flatten' or 'reshape' (a
    Linear on every position's channels, C*H*W or N*C inputs, through x.flatten(1) or
    x.reshape(B, -1))."""

    def __init__(self, kind: str, image: bool, c: int, positions: int) -> None:
        super().__init__()
        self.kind, self.image = kind, image
        self.fc = nn.Linear(c * positions if kind in ("flatten", "reshape") else c, OUT)

    def forward(self, x):
        if self.kind == "flatten":
            return self.fc(x.flatten(1))
        if self.kind == "reshape":
            return self.fc(x.reshape(x.shape[0], -1))
        if self.kind == "first":
            return self.fc(x[:, 0])
        return self.fc(x.mean((2, 3)) if self.image else x.mean(1))


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x):
        return self.head(self.blocks(x))


# ---------------------------------------------------------------------------------------------
# the generator: a spec (plain tuples, printed by hypothesis on a failure) and its network

KERNELS = st.sampled_from([1, 3])
ACTIVATIONS = st.sampled_from(sorted(ACTS))
CHANNELS = st.sampled_from(WIDTHS)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _image_block(draw, c: int, hw: int, inner: bool = False) -> tuple:
    """An image block on ``c`` channels of side ``hw``; ``inner``: inside a residual (no nested
    residual, nothing that changes the side length)."""
    # one flat list of constructs, so that each is drawn about as often as the others
    kinds = ["conv", "gconv", "dwconv", "bn", "gn", "ln", "residual", "se", "concat"] + ([] if inner else ["blocks"])
    kinds += [f"split {mode}" for mode in (["conv", "swap"] if c > 1 else []) + (["glu", "sum"] if c % 2 == 0 else [])]
    if len(_divisors(c)) > 2:
        kinds.append("split shuffle")
    kinds += ["pool max3"] + (["pool max", "pool avg", "pool adaptive"] if hw >= 2 and not inner else [])
    kind = draw(st.sampled_from(kinds))
    act = draw(ACTIVATIONS)
    if kind == "conv":
        return ("conv", draw(CHANNELS), draw(KERNELS), 1, draw(st.booleans()), act)
    if kind == "gconv":
        c_out = draw(CHANNELS)
        return ("gconv", c_out, draw(KERNELS), draw(st.sampled_from(_divisors(math.gcd(c, c_out)))), draw(st.booleans()), act)
    if kind == "dwconv":
        return ("dwconv", c * draw(st.sampled_from([1, 2])), 3, c, draw(st.booleans()), act)
    if kind in ("bn", "gn", "ln"):
        return ("norm", kind, draw(st.sampled_from(_divisors(c))) if kind == "gn" else 0, draw(st.booleans()))
    if kind == "residual":
        return ("residual", draw(CHANNELS), draw(KERNELS))
    if kind == "blocks":
        blocks, c_inner = [], c
        for _ in range(draw(st.integers(1, 3))):
            blocks.append(draw(_image_block(c_inner, hw, inner=True)))
            c_inner, _ = _image_width(blocks[-1], c_inner, hw)
        return ("blocks", tuple(blocks))
    if kind == "se":
        return ("se", draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from(["conv", "linear", "view"])))
    if kind == "concat":
        dense = draw(st.booleans())
        return ("concat", 0 if dense else draw(CHANNELS), draw(CHANNELS), dense)
    if kind.startswith("split"):
        mode = kind.split()[1]
        first = draw(st.integers(1, c - 1)) if mode in ("conv", "swap") else c // 2
        shuffle = draw(st.sampled_from(_divisors(c)[1:-1])) if mode == "shuffle" else 0
        return ("split", mode, first, draw(CHANNELS) if mode == "conv" else 0, shuffle)
    return ("pool", kind.split()[1])


@st.composite
def _token_block(draw, c: int) -> tuple:
    kind = draw(st.sampled_from(["linear", "norm", "mlp", "attention", "mixer"]))
    if kind == "linear":
        return ("linear", draw(CHANNELS), draw(ACTIVATIONS))
    if kind == "norm":
        return ("tnorm", draw(st.booleans()))
    if kind == "mlp":
        return ("mlp", draw(CHANNELS), draw(st.booleans()))
    if kind == "mixer":
        return ("mixer",)
    heads, head_dim = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 4]))
    merges = ["minus1", "const"] + (["shape"] if heads * head_dim == c else [])
    return ("attention", heads, head_dim, draw(st.booleans()), draw(st.sampled_from(merges)), draw(st.booleans()))


def _image_width(block: tuple, c: int, hw: int) -> tuple[int, int]:
    """Channels and side length after an image block."""
    kind = block[0]
    if kind in ("conv", "gconv", "dwconv"):
        return block[1], hw
    if kind == "concat":
        return (c if block[3] else block[1]) + block[2], hw
    if kind == "blocks":
        return c, hw
    if kind == "split":
        mode, first, c_conv = block[1], block[2], block[3]
        return {"glu": c // 2, "sum": c // 2, "conv": c_conv + c - first}.get(mode, c), hw
    if kind == "pool":
        return c, {"max": hw // 2, "avg": hw // 2, "adaptive": 2}.get(block[1], hw)
    return c, hw


def _token_width(block: tuple, c: int) -> int:
    return block[1] if block[0] == "linear" else c


@st.composite
def networks(draw) -> dict:
    """A network spec: input, image blocks, tokenisation, token blocks, head, weight seed."""
    image = draw(st.integers(0, 2)) > 0  # two image networks for a token one: they have more constructs
    spec = {"image": image, "image_blocks": [], "to_tokens": None, "token_blocks": [], "seed": draw(st.integers(0, 2 ** 16))}
    if image:
        hw = draw(st.sampled_from([2, 4, 6]))
        spec["hw"] = hw
        c = 3
        # a stem: blocks straight on the input find its channels fixed and have little to prune
        stem = ("conv", draw(CHANNELS), draw(KERNELS), 1, draw(st.booleans()), draw(ACTIVATIONS))
        for i in range(1 + draw(st.integers(0, 4))):
            block = stem if i == 0 else draw(_image_block(c, hw))
            spec["image_blocks"].append(block)
            c, hw = _image_width(block, c, hw)
        if draw(st.booleans()):
            spec["to_tokens"] = draw(st.sampled_from(["flatten", "permute"]))
    if not image or spec["to_tokens"]:
        n_token_blocks = draw(st.integers(0, 3))
        if not image:
            c = 6
            n_token_blocks += 1  # a Linear stem, as for images
        for i in range(n_token_blocks):
            stem = i == 0 and not image
            block = ("linear", draw(CHANNELS), draw(ACTIVATIONS)) if stem else draw(_token_block(c))
            spec["token_blocks"].append(block)
            c = _token_width(block, c)
    heads = ["mean", "flatten", "reshape"] + (["first"] if not image or spec["to_tokens"] else [])
    spec["head"] = draw(st.sampled_from(heads))
    return spec


TOKENS = 5  # tokens of a token input


def _image_modules(c: int, hw: int, spec: tuple | list) -> tuple[nn.Sequential, int, int]:
    """The modules of image block specs on ``c`` channels of side ``hw``, their width and side."""
    modules = []
    for block in spec:
        kind, args = block[0], block[1:]
        if kind in ("conv", "gconv", "dwconv"):
            modules.append(Conv(c, *args))
        elif kind == "norm":
            modules.append(Norm2d(c, *args))
        elif kind == "residual":
            modules.append(Residual(c, *args))
        elif kind == "blocks":
            modules.append(ResidualBlocks(c, hw, *args))
        elif kind == "se":
            modules.append(SqueezeExcite(c, *args))
        elif kind == "concat":
            modules.append(Concat(c, *args))
        elif kind == "split":
            modules.append(Split(c, *args))
        else:
            modules.append(Pool(*args))
        c, hw = _image_width(block, c, hw)
    return nn.Sequential(*modules), c, hw


def build(spec: dict) -> tuple[nn.Module, torch.Tensor]:
    """The network a spec describes, with seeded random weights, and its input."""
    torch.manual_seed(spec["seed"])
    blocks: list[nn.Module] = []
    if spec["image"]:
        c, hw = 3, spec["hw"]
        x = torch.randn(BATCH, c, hw, hw)
        image_blocks, c, hw = _image_modules(c, hw, spec["image_blocks"])
        blocks.append(image_blocks)
        positions = hw * hw
        if spec["to_tokens"]:
            blocks.append(ToTokens(spec["to_tokens"]))
    else:
        c, positions = 6, TOKENS
        x = torch.randn(BATCH, TOKENS, c)
    for block in spec["token_blocks"]:
        kind, args = block[0], block[1:]
        if kind == "linear":
            blocks.append(TokenLinear(c, *args))
        elif kind == "tnorm":
            blocks.append(TokenNorm(c, *args))
        elif kind == "mlp":
            blocks.append(Mlp(c, *args))
        elif kind == "mixer":
            blocks.append(TokenMixer(c, positions))
        else:
            blocks.append(Attention(c, *args))
        c = _token_width(block, c)
    head = Head(spec["head"], spec["image"] and not spec["to_tokens"], c, positions)
    return Net(blocks, head).eval(), x


# ---------------------------------------------------------------------------------------------
# the property

def _construct(block: tuple) -> str:
    """A block's name for hypothesis' statistics (``--hypothesis-show-statistics``)."""
    name = " ".join(str(part) for part in block[:2] if isinstance(part, str))
    functional = block[0] in ("norm", "tnorm") and block[-1]
    return f"{name} (functional)" if functional else name


def check_random_pruning(spec: dict, data: st.DataObject) -> None:
    blocks = spec["image_blocks"] + spec["token_blocks"]
    for block in blocks + [inner for b in blocks if b[0] == "blocks" for inner in b[1]]:
        event(_construct(block))
    event(f"head {spec['head']}" + (f" after tokens ({spec['to_tokens']})" if spec["to_tokens"] else ""))
    model, x = build(spec)
    dense = outputs(model, x)
    groups = gp.channel_groups(model, (x,))
    assert_same(outputs(model, x), dense, atol=1e-6)  # tracing leaves the model alone

    # groups that can lose a channel: a random non-empty subset, each losing 1 .. size-1 channels
    prunable = [g for g in groups if g.prunable and g.size > 1]
    chosen = []
    if prunable:
        chosen = data.draw(st.lists(st.sampled_from(prunable), min_size=1, unique_by=lambda g: g.id), label="groups")
    keep: dict[int, torch.Tensor] = {}
    for g in chosen:
        removed = data.draw(st.integers(1, g.size - 1), label=f"removed of group {g.id} ({g.size})")
        seed = data.draw(st.integers(0, 2 ** 16), label="seed")
        keep.update(gp.random_keep([g], removed / g.size, seed))
        assert int((~keep[g.id]).sum()) == removed
    assert all(bool(k.any()) for k in keep.values())

    masks = gp.group_masks(model, groups, keep)
    pruned = gp.ModelSpeedup(copy.deepcopy(model), x, masks).speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(gp.masked_copy(model, masks), x), rtol=1e-4, atol=1e-4)
    gp.channel_groups(pruned, (x,))
    event(f"prunable groups: {len(prunable)}" if len(prunable) < 3 else "prunable groups: 3 or more")
    if keep:
        event("channels removed")
        assert n_params(pruned) < n_params(model)
    else:
        event("nothing to remove")
        assert n_params(pruned) == n_params(model)


FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=100, **FUZZ)
@given(spec=networks(), data=st.data())
def test_random_network_pruned_equals_masked_and_traces_again(spec, data):
    check_random_pruning(spec, data)


@pytest.mark.slow
@settings(max_examples=1000, **FUZZ)
@given(spec=networks(), data=st.data())
def test_random_network_pruned_equals_masked_and_traces_again_1000(spec, data):
    check_random_pruning(spec, data)
