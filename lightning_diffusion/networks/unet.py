"""A small conventional diffusion UNet (DDPM / ADM family), the library's default network.

Layout: conv in -> encoder (residual blocks, optional self-attention, strided-conv downsampling)
-> middle (res, attention, res) -> decoder (residual blocks on skip concatenations,
nearest + conv upsampling) -> GroupNorm, SiLU, conv out. The noise level and the class label
enter every residual block as a GroupNorm scale/shift (adaptive GroupNorm, ADM). The last conv
of every residual block, every attention projection and the output conv start at zero, so the
blocks start as identities and the network's output is exactly zero at initialization.

Contract used by ``DiffusionLightningModule``: ``net(x, noise_level, class_labels=None)`` returns
a tensor shaped like ``x`` (with ``out_channels`` channels). The forward pass has no
data-dependent Python control flow and no host syncs, so it compiles with ``torch.compile``
and runs under bf16/fp16 autocast.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (check_channel_mult, check_downsampling, check_dropout, check_input, check_num_classes,
                     check_positive)


def sinusoidal_embedding(noise_level: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer positional embedding of a real-valued noise level, [B] -> [B, dim] in fp32.

    Frequencies run geometrically from 1 down to 1/max_period and are applied to the raw value,
    as in DDPM/ADM (timestep index 0..999) and EDM's DDPM++ (c_noise = ln(sigma)/4, about -2..2):
    large values are resolved by the low frequencies, small ones by the high frequencies.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=noise_level.device))
    args = noise_level.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_init(module: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero so the branch it ends starts switched off."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, adaGN(emb), SiLU, dropout, zero-init conv, plus a (1x1) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions, residual, zero-init output."""

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(h).reshape(b, hgt * wid, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        h = self.proj(h.transpose(1, 2).reshape(b, hgt * wid, c))
        return x + h.transpose(1, 2).reshape(b, c, hgt, wid)


class ResAttnBlock(nn.Module):
    """A residual block optionally followed by self-attention (one UNet stage)."""

    def __init__(self, res: ResBlock, attn: SelfAttention | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_config(unet: "UNet") -> None:
    """Raise ValueError, one sentence naming the setting, for a configuration the UNet cannot build."""
    check_positive(unet, ("in_channels", "out_channels", "image_size", "model_channels", "num_res_blocks",
                          "num_heads", "num_groups"))
    check_channel_mult(unet)
    if any(r < 1 for r in unet.attention_resolutions):
        raise ValueError(f"UNet.attention_resolutions={unet.attention_resolutions} must hold feature-map sizes >= 1.")
    check_dropout(unet)
    check_num_classes(unet)
    check_downsampling(unet)
    for mult in (1, *unet.channel_mult):
        if unet.model_channels * mult % unet.num_groups != 0:
            raise ValueError(
                f"UNet.model_channels*mult={unet.model_channels}*{mult} is not divisible by "
                f"UNet.num_groups={unet.num_groups}; choose num_groups dividing model_channels."
            )
    for level, mult in enumerate(unet.channel_mult):
        if unet.image_size // 2**level in unet.attention_resolutions and unet.model_channels * mult % unet.num_heads:
            raise ValueError(
                f"UNet.num_heads={unet.num_heads} does not divide the {unet.model_channels * mult} channels "
                f"at attention resolution {unet.image_size // 2**level}; use a divisor of model_channels."
            )


class UNet(nn.Module):
    """Small conventional diffusion UNet: ``net(x, noise_level, class_labels=None) -> Tensor``.

    Args:
        in_channels: image channels of ``x``.
        out_channels: channels of the output; ``None`` means ``in_channels``.
        image_size: height = width of ``x``; must be divisible by ``2**(len(channel_mult)-1)``.
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level; each level after the first halves H, W.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature-map sizes (e.g. 4 for 4x4) where self-attention is used;
            sizes the network never reaches are ignored.
        num_heads: attention heads; must divide the channels at the attention levels.
        dropout: dropout probability inside residual blocks.
        num_classes: number of classes; 0 = unconditional. Label ``num_classes`` is the null
            class (classifier-free guidance); ``class_labels=None`` means all null.
        num_groups: GroupNorm groups; must divide ``model_channels * m`` for every multiplier.

    ``noise_level`` is a float tensor [B] (or a scalar) of any real value: the VP timestep index
    (0..999) or EDM's c_noise = ln(sigma)/4; it is embedded with ``sinusoidal_embedding``.

    Example::

        net = UNet(in_channels=1, image_size=8, num_classes=10)
        out = net(torch.randn(4, 1, 8, 8), torch.rand(4) * 999, torch.tensor([0, 3, 9, 10]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 8,
        model_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (4,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int = 0,
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.image_size = image_size
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.num_heads = num_heads
        self.dropout = dropout
        self.num_classes = num_classes
        self.num_groups = num_groups
        _check_config(self)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self._build_encoder_decoder(emb_dim)
        self.norm_out = nn.GroupNorm(num_groups, model_channels * self.channel_mult[0])
        self.conv_out = zero_init(nn.Conv2d(model_channels * self.channel_mult[0], self.out_channels, 3, padding=1))

    def _stage(self, in_ch: int, out_ch: int, resolution: int, emb_dim: int) -> ResAttnBlock:
        res = ResBlock(in_ch, out_ch, emb_dim, self.dropout, self.num_groups)
        use_attn = resolution in self.attention_resolutions
        return ResAttnBlock(res, SelfAttention(out_ch, self.num_heads, self.num_groups) if use_attn else None)

    def _build_encoder_decoder(self, emb_dim: int) -> None:
        """ADM layout: every encoder output is a skip; every decoder stage consumes one."""
        ch, res = self.model_channels, self.image_size
        skip_chs = [ch]
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                self.encoder.append(self._stage(ch, self.model_channels * mult, res, emb_dim))
                ch = self.model_channels * mult
                skip_chs.append(ch)
            if level < len(self.channel_mult) - 1:
                self.encoder.append(Downsample(ch))
                res //= 2
                skip_chs.append(ch)
        middle_out = ResAttnBlock(ResBlock(ch, ch, emb_dim, self.dropout, self.num_groups), None)
        self.middle = nn.ModuleList([self._stage(ch, ch, res, emb_dim), middle_out])
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                self.decoder.append(self._stage(ch + skip_chs.pop(), self.model_channels * mult, res, emb_dim))
                ch = self.model_channels * mult
            if level > 0:
                self.decoder.append(Upsample(ch))
                res *= 2

    def embed(self, noise_level: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        """Noise-level embedding plus (if conditional) class embedding, [B, 4 * model_channels]."""
        t = noise_level.reshape(-1).expand(batch)
        emb = sinusoidal_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.class_embed(class_labels.reshape(-1))
        return emb

    def forward(self, x: Tensor, noise_level: Tensor, class_labels: Tensor | None = None) -> Tensor:
        check_input(self, x, noise_level)
        emb = self.embed(noise_level, class_labels, x.shape[0])
        h = self.conv_in(x)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for block in self.decoder:  # the structure is fixed at build time: compiles to straight-line code
            if isinstance(block, ResAttnBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
