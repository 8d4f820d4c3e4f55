"""DiT (Peebles & Xie 2023) built from timm's ``PatchEmbed``, ``Attention`` and ``Mlp``.

Patchify -> fixed 2-D sin-cos positions -> ``depth`` transformer blocks with adaLN-zero
conditioning on ``c = embed(noise_level) + embed(class)`` -> adaLN final layer -> unpatchify.
Every adaLN modulation and the final linear start at zero, so each block starts as the identity
and the network outputs exactly 0: the EDM-preconditioned denoiser starts as ``D(x) = c_skip x``.

Sizes (``DIT_SIZES``): tiny (CPU tests), S, B, L, XL with any patch size (2, 4, 8);
DiT-XL/2 at 32x32x4 latents with 1000 classes and 8 output channels has 675M parameters.
"""

from __future__ import annotations

import torch
from timm.layers import GELUTanh, Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from .checks import check_input, check_num_classes, check_positive
from .unet import sinusoidal_embedding

__all__ = ["DiT", "DiTBlock", "DIT_SIZES"]

DIT_SIZES = {  # hidden_size, depth, num_heads
    "tiny": dict(hidden_size=64, depth=4, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample [B, D] shift/scale over tokens [B, N, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (half the channels per axis; dim % 4 == 0)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    parts = [torch.outer(g.reshape(-1), omega) for g in (gy, gx)]
    return torch.cat([f(p) for p in parts for f in (torch.sin, torch.cos)], dim=1).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-zero: shift, scale and a gate per branch from ``c``, gates 0 at init."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=GELUTanh)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def _check_config(net: "DiT") -> None:
    """Raise ValueError, one sentence naming the setting, for a configuration the DiT cannot build."""
    check_positive(net, ("in_channels", "image_size", "patch_size", "hidden_size", "depth", "num_heads"))
    if net.image_size % net.patch_size:
        raise ValueError(
            f"DiT.image_size={net.image_size} is not divisible by DiT.patch_size={net.patch_size}; "
            "use a patch size that divides the image size."
        )
    if net.hidden_size % net.num_heads or net.hidden_size % 4:
        raise ValueError(
            f"DiT.hidden_size={net.hidden_size} must be divisible by 4 and by DiT.num_heads={net.num_heads}."
        )
    check_num_classes(net)


class DiT(nn.Module):
    """Diffusion transformer from timm blocks: ``net(x, noise_level, class_labels=None) -> Tensor``.

    Args:
        in_channels: image channels; out_channels: output channels (``None``: same).
        image_size: height = width; must be divisible by ``patch_size``.
        patch_size: side of the square patches (2, 4, 8 in the paper).
        hidden_size, depth, num_heads: transformer width, blocks, heads (see ``DIT_SIZES``).
        mlp_ratio: MLP hidden width / hidden_size.
        num_classes: 0 = unconditional; label ``num_classes`` (or ``class_labels=None``) is the
            null label, which has its own learned embedding (classifier-free guidance).
        frequency_dim: width of the sinusoidal noise-level features.

    ``noise_level`` is any real value (VP timestep index or EDM's ``c_noise``), embedded with the
    same sinusoidal features as the default UNet.

    Example::

        net = DiT(in_channels=1, image_size=8, patch_size=2, **DIT_SIZES["tiny"], num_classes=10)
        out = net(torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 9, 10]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 8,
        patch_size: int = 2,
        hidden_size: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        frequency_dim: int = 256,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.frequency_dim = num_classes, frequency_dim
        _check_config(self)
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, image_size // patch_size), persistent=False)
        self.noise_embed = Mlp(frequency_dim, hidden_size, hidden_size, act_layer=nn.SiLU)
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear_out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT init: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output (adaLN-zero)."""
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for layer in self.noise_embed.fc1, self.noise_embed.fc2:
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for linear in [b.adaLN[1] for b in self.blocks] + [self.adaLN_out[1], self.linear_out]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def embed(self, noise_level: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        """Conditioning vector ``c`` [B, hidden_size]."""
        t = noise_level.reshape(-1).expand(batch)
        weight = self.noise_embed.fc1.weight
        c = self.noise_embed(sinusoidal_embedding(t, self.frequency_dim).to(weight.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=c.device)
            c = c + self.class_embed(class_labels.reshape(-1).long())
        return c

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        b, p, g, ch = tokens.shape[0], self.patch_size, self.image_size // self.patch_size, self.out_channels
        x = tokens.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, ch, g * p, g * p)

    def forward(self, x: Tensor, noise_level: Tensor, class_labels: Tensor | None = None) -> Tensor:
        check_input(self, x, noise_level)
        c = self.embed(noise_level, class_labels, x.shape[0])
        h = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.adaLN_out(c).chunk(2, dim=1)
        return self.unpatchify(self.linear_out(modulate(self.norm_out(h), shift, scale)))

