"""EDM2 magnitude-preserving UNet (Karras et al. 2024, config G), docs/algorithms.md 3.1.

Built only from the MP primitives of ``networks/mp.py``: no biases, no normalization layers
with learned affine parameters, no additive conditioning. The only learned scalars are each
block's ``emb_gain`` and the output ``out_gain``, both 0 at init, so the network outputs exactly
0 and the EDM-preconditioned denoiser starts as ``D(x) = c_skip x``.

Layout per resolution level (64 -> 32 -> 16 -> 8 for the paper's 64x64 latents):
encoder = [input conv | down block] + ``num_blocks`` blocks; decoder = [two blocks (the first
with attention) | up block] + ``num_blocks + 1`` blocks, each after ``mp_cat`` with the skip.
The embedding is ``mp_silu(mp_sum(MPConv(MPFourier(c_noise)), MPConv(onehot * sqrt(L)), 0.5))``.

Presets (``EDM2_PRESETS``, ImageNet-512 latents 64x64x4, 1000 classes): XS/S/M/L/XL/XXL =
model_channels 128/192/256/320/384/448, channel_mult (1, 2, 3, 4), 3 blocks per level,
attention at 16 and 8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (check_channel_mult, check_downsampling, check_dropout, check_input, check_num_classes,
                     check_positive)
from .mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize

__all__ = ["EDM2UNet", "EDM2Block", "EDM2_PRESETS"]

EDM2_PRESETS = {"XS": 128, "S": 192, "M": 256, "L": 320, "XL": 384, "XXL": 448}  # model_channels


class EDM2Block(nn.Module):
    """One MP residual block (3.1): resample, [skip conv, pixel norm], two 3x3 convs, attention.

    ``flavor="enc"`` projects and pixel-normalizes the input before the residual branch;
    ``"dec"`` projects the input only where the residual joins. ``resample`` is ``"keep"``,
    ``"down"`` (2x2 average) or ``"up"`` (nearest).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float = 256.0) -> None:
        super().__init__()
        self.out_channels, self.flavor, self.resample = out_channels, flavor, resample
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([1]))  # scale-only conditioning starts switched off
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if attention else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: unit RMS over channels at every position
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # scale-only conditioning, 1 at init
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.dropout:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.attn_qkv is not None:
            x = mp_sum(x, self._attention(x), self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act)  # activation clamp against rare fp16/bf16 blow-ups

    def _attention(self, x: Tensor) -> Tensor:
        """Cosine attention: q, k, v each normalized per head and position (3.1)."""
        b, ch, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(b, self.num_heads, ch // self.num_heads, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # [B, heads, c, HW] each
        # SDPA scales q.k by 1/sqrt(c): unit vectors' dot products / sqrt(c) as in EDM2.
        y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return self.attn_proj(y.transpose(-1, -2).reshape(b, ch, h, w))


def _check_config(net: "EDM2UNet") -> None:
    """Raise ValueError, one sentence naming the setting, for a configuration the network cannot build."""
    check_positive(net, ("in_channels", "image_size", "model_channels", "num_blocks", "channels_per_head"))
    check_channel_mult(net)
    check_num_classes(net)
    check_dropout(net)
    check_downsampling(net)


class EDM2UNet(nn.Module):
    """EDM2 magnitude-preserving UNet: ``net(x, noise_level, class_labels=None) -> Tensor``.

    Args:
        in_channels: image channels (a constant ones channel is appended inside).
        out_channels: output channels; ``None`` means ``in_channels``.
        image_size: height = width; must be divisible by ``2**(len(channel_mult)-1)``.
        model_channels: base width (paper: 128..448, see ``EDM2_PRESETS``; CPU tests: 16-32).
        channel_mult: width multiplier per level; each level after the first halves H, W.
        num_blocks: blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature-map sizes with cosine self-attention (the lowest level's
            first decoder block always has it).
        channels_per_head: attention head width (heads = channels // this, at least 1).
        num_classes: classes; 0 = unconditional. Label ``num_classes`` (and ``class_labels=None``)
            is the null label, embedded as the zero vector.
        dropout: dropout inside blocks.
        noise_level_scale: multiplies ``noise_level`` before the Fourier features; 1 for EDM's
            ``c_noise = ln(sigma)/4``; about 0.002 for VP timestep indices 0..999.
        label_balance, concat_balance: ``mp_sum`` / ``mp_cat`` blend factors (0.5, 0.5).

    Example::

        net = EDM2UNet(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2),
                       num_blocks=1, attention_resolutions=(4,), num_classes=10)
        out = net(torch.randn(4, 1, 8, 8), torch.randn(4) * 0.5, torch.tensor([0, 3, 9, 10]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 8,
        model_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (4,),
        channels_per_head: int = 64,
        num_classes: int = 0,
        dropout: float = 0.0,
        noise_level_scale: float = 1.0,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.image_size, self.model_channels = image_size, model_channels
        self.channel_mult, self.num_blocks = tuple(channel_mult), num_blocks
        self.attention_resolutions, self.channels_per_head = tuple(attention_resolutions), channels_per_head
        self.num_classes, self.dropout = num_classes, dropout
        self.noise_level_scale = noise_level_scale
        self.label_balance, self.concat_balance = label_balance, concat_balance
        _check_config(self)
        widths = [model_channels * m for m in self.channel_mult]
        emb_channels = max(widths)
        self.emb_fourier = MPFourier(widths[0])
        self.emb_noise = MPConv(widths[0], emb_channels, ())
        self.emb_label = MPConv(num_classes, emb_channels, ()) if num_classes else None
        # Gains are 1-element vectors, not scalars: FSDP2 cannot shard 0-dim parameters. Checkpoints of
        # the scalar version still load (reshaped by the hook).
        self.out_gain = nn.Parameter(torch.zeros([1]))  # output 0 at init: D(x) = c_skip x
        self._register_load_state_dict_pre_hook(scalar_gains_as_vectors)
        self._build(widths, emb_channels)

    def _block(self, cin: int, cout: int, emb: int, flavor: str, resample: str = "keep",
               attention: bool = False) -> EDM2Block:
        return EDM2Block(cin, cout, emb, flavor, resample, attention, self.channels_per_head, self.dropout)

    def _build(self, widths: list[int], emb: int) -> None:
        """Encoder (every output is a skip) and decoder (every non-resampling block takes one)."""
        self.conv_in = MPConv(self.in_channels + 1, widths[0], (3, 3))
        self.encoder, self.decoder = nn.ModuleList(), nn.ModuleList()
        cout, skips = widths[0], [widths[0]]
        for level, width in enumerate(widths):
            res = self.image_size >> level
            if level > 0:
                self.encoder.append(self._block(cout, cout, emb, "enc", "down"))
                skips.append(cout)
            for _ in range(self.num_blocks):
                self.encoder.append(self._block(cout, width, emb, "enc", attention=res in self.attention_resolutions))
                cout = width
                skips.append(cout)
        self.takes_skip: list[bool] = []  # plain Python structure: compiles to straight-line code
        for level, width in reversed(list(enumerate(widths))):
            res = self.image_size >> level
            if level == len(widths) - 1:
                self._append_dec(self._block(cout, cout, emb, "dec", attention=True), False)
                self._append_dec(self._block(cout, cout, emb, "dec"), False)
            else:
                self._append_dec(self._block(cout, cout, emb, "dec", "up"), False)
            for _ in range(self.num_blocks + 1):
                attn = res in self.attention_resolutions
                self._append_dec(self._block(cout + skips.pop(), width, emb, "dec", attention=attn), True)
                cout = width
        self.conv_out = MPConv(cout, self.out_channels, (3, 3))

    def _append_dec(self, block: EDM2Block, takes_skip: bool) -> None:
        self.decoder.append(block)
        self.takes_skip.append(takes_skip)

    def embed(self, noise_level: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        """Noise (and class) embedding, [B, max(widths)] at unit RMS."""
        c_noise = noise_level.reshape(-1).expand(batch) * self.noise_level_scale
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
            # One-hot over num_classes + 1 with the null column dropped: the null label is zero.
            onehot = F.one_hot(class_labels.reshape(-1).long(), self.num_classes + 1)[:, : self.num_classes]
            label = self.emb_label(onehot.to(emb.dtype) * math.sqrt(self.num_classes))
            emb = mp_sum(emb, label, self.label_balance)
        return mp_silu(emb)

    def forward(self, x: Tensor, noise_level: Tensor, class_labels: Tensor | None = None) -> Tensor:
        check_input(self, x, noise_level)
        emb = self.embed(noise_level, class_labels, x.shape[0])
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # constant channel: lets convs see borders
        x = self.conv_in(x)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block, takes_skip in zip(self.decoder, self.takes_skip):
            if takes_skip:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.conv_out(x, gain=self.out_gain)


def scalar_gains_as_vectors(state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Load-time hook: ``emb_gain``/``out_gain`` saved as 0-dim scalars (before FSDP2 support) become [1]."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(("emb_gain", "out_gain"))]:
        if state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].reshape(1)
