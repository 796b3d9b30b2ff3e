"""TinyViT: the light image encoder of LiteMedSAM and MobileSAM, for SAM's prompt encoder and mask decoder.

Written for MedFM from the published architecture (Wu et al., *TinyViT*, ECCV 2022, as adapted to SAM by
MobileSAM and LiteMedSAM). Module names follow the released checkpoints' state-dict keys, so the official
files load strictly. The network, stage by stage:

- a patch embedding of two convolutions with batch norm (3x3 stride 2 each for MobileSAM's 1024 input,
  1x1 stride 1 for LiteMedSAM's 256 input: both reach a 256x256 grid);
- stage 0: inverted-residual convolution blocks (MBConv), then a patch merging that halves the grid;
- stages 1 to 3: transformer blocks that attend within local windows, with a learned bias per relative
  offset, then a depthwise 3x3 convolution and an MLP; patch merging halves the grid after stage 1 and keeps
  it after stage 2, so stages 2 and 3 run on 64x64 tokens;
- a neck of a 1x1 and a 3x3 convolution, each followed by a channel LayerNorm: 256 channels at 64x64,
  what SAM's decoder takes.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .sam import TinyVitArchitecture


class ConvBN(nn.Sequential):
    """A convolution without bias, then batch norm (keys ``c`` and ``bn``).

    In eval mode the batch norm is folded into the convolution's weights and bias: one pass over the
    feature map instead of two (the same arithmetic, to float rounding).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        conv, norm = self.c, self.bn
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = conv.weight * scale[:, None, None, None]
        bias = norm.bias - norm.running_mean * scale
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class PatchEmbed(nn.Module):
    def __init__(self, out_chans: int, kernel: int) -> None:
        super().__init__()
        stride = 2 if kernel == 3 else 1
        half = out_chans // 2
        self.seq = nn.Sequential(ConvBN(3, half, kernel, stride), nn.GELU(), ConvBN(half, out_chans, kernel, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1); a residual connection, GELU after each step."""

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = ConvBN(chans, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Tokens (or a feature map) to ``out_dim`` channels, the grid halved with ``stride`` 2 (kept with 1)."""

    def __init__(self, grid: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.grid = grid
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (B, tokens, C) from a transformer stage
            x = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


def _offset_index(window: int) -> tuple[int, torch.Tensor]:
    """For every pair of positions in a window, the index of their (|dy|, |dx|) offset, numbered as first met."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    index = []
    for a in points:
        for b in points:
            offset = (abs(a[0] - b[0]), abs(a[1] - b[1]))
            index.append(offsets.setdefault(offset, len(offsets)))
    return len(offsets), torch.tensor(index, dtype=torch.long).view(len(points), len(points))


class WindowAttention(nn.Module):
    """Multi-head self-attention over one window's tokens, with a learned bias per head and relative offset."""

    #: q, k and v as three products instead of one split three ways: the same numbers, and OpenVINO then has
    #: no split to run (its CPU split is a reference kernel, and LiteMedSAM's encoder went 0.91-0.95 s ->
    #: 0.86-0.87 s). Set while converting (``runtime.py``); torch keeps the one product that LoRA's adapters wrap.
    separate_qkv = False

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        count, index = _offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, count))
        self.register_buffer("bias_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        if self.separate_qkv and type(self.qkv) is nn.Linear:  # a LoRA-wrapped projection must run whole
            q, k, v = self._separate_qkv(self.norm(x))
        else:
            # Per head the projection holds q, k and v side by side.
            qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3 * self.head_dim).transpose(1, 2)
            q, k, v = qkv.split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.bias_index]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))

    def _separate_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, _ = x.shape
        heads, width = self.num_heads, self.head_dim
        weight, bias = self.qkv.weight.view(heads, 3, width, -1), self.qkv.bias.view(heads, 3, width)
        return tuple(
            F.linear(x, weight[:, part].reshape(heads * width, -1), bias[:, part].reshape(-1))
            .view(batch, tokens, heads, width).transpose(1, 2)
            for part in range(3)
        )  # fmt: skip


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyVitBlock(nn.Module):
    def __init__(self, dim: int, grid: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.grid, self.window = grid, window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, chans = x.shape
        grid, window = self.grid, self.window
        if grid == window:
            return self.attn(x)
        pad = (window - grid % window) % window  # the grid is padded at the bottom and right
        x = F.pad(x.view(batch, grid, grid, chans), (0, 0, 0, pad, 0, pad))
        size, count = grid + pad, (grid + pad) // window
        windows = x.view(batch, count, window, count, window, chans).transpose(2, 3)
        windows = windows.reshape(-1, window * window, chans)
        x = self.attn(windows).view(batch, count, count, window, window, chans).transpose(2, 3)
        return x.reshape(batch, size, size, chans)[:, :grid, :grid].reshape(batch, grid * grid, chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, chans = x.shape
        x = x + self._windowed(x)
        x = self.local_conv(x.transpose(1, 2).reshape(batch, chans, self.grid, self.grid))
        x = x.view(batch, chans, tokens).transpose(1, 2)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    def __init__(self, dim, grid, depth, num_heads, window, mlp_ratio, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TinyVitBlock(dim, grid, num_heads, window, mlp_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a feature map (as SAM's neck)."""

    def __init__(self, chans: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(chans))
        self.bias = nn.Parameter(torch.zeros(chans))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - mean) / torch.sqrt(variance + self.eps) + self.bias[:, None, None]


class TinyViT(nn.Module):
    """The image encoder: (B, 3, image_size, image_size) in, (B, 256, 64, 64) out."""

    def __init__(self, arch: TinyVitArchitecture) -> None:
        super().__init__()
        self.img_size = arch.image_size  # what SamEngine and segment-anything's Sam read
        dims, grid = arch.embed_dims, arch.grid
        self.patch_embed = PatchEmbed(dims[0], arch.patch_kernel)
        # The grid per stage: halved after stages 0 and 1, kept after stage 2 (a 64x64 output, as SAM's).
        grids = [grid, grid // 2, grid // 4, grid // 4]
        self.out_grid = grids[-1]
        layers: list[nn.Module] = [
            ConvStage(dims[0], arch.depths[0], arch.mbconv_expand_ratio, PatchMerging(grids[0], dims[0], dims[1], 2))
        ]
        for stage in range(1, len(dims)):
            last = stage == len(dims) - 1
            stride = 2 if stage == 1 else 1
            downsample = None if last else PatchMerging(grids[stage], dims[stage], dims[stage + 1], stride)
            layers.append(
                AttentionStage(dims[stage], grids[stage], arch.depths[stage], arch.num_heads[stage],
                               arch.window_sizes[stage], arch.mlp_ratio, downsample)  # fmt: skip
            )
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], arch.prompt_embed_dim, 1, bias=False),
            LayerNorm2d(arch.prompt_embed_dim),
            nn.Conv2d(arch.prompt_embed_dim, arch.prompt_embed_dim, 3, padding=1, bias=False),
            LayerNorm2d(arch.prompt_embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last memory halves the time of the convolutions of stage 0, the costliest part on a CPU.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        batch, _, chans = x.shape
        x = x.view(batch, self.out_grid, self.out_grid, chans).permute(0, 3, 1, 2)
        return self.neck(x)
