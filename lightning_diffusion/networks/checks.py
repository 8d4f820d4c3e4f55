"""Configuration checks the networks share: each raises ValueError, one sentence naming ``Class.setting``."""

from __future__ import annotations

from typing import Any


def check_positive(net: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(net, name) < 1:
            raise ValueError(f"{type(net).__name__}.{name}={getattr(net, name)} must be >= 1.")


def check_channel_mult(net: Any) -> None:
    if len(net.channel_mult) == 0 or min(net.channel_mult) < 1:
        raise ValueError(f"{type(net).__name__}.channel_mult={net.channel_mult} must be a non-empty tuple of "
                         f"integers >= 1.")


def check_dropout(net: Any) -> None:
    if not 0.0 <= net.dropout < 1.0:
        raise ValueError(f"{type(net).__name__}.dropout={net.dropout} must be in [0, 1).")


def check_num_classes(net: Any) -> None:
    if net.num_classes < 0:
        raise ValueError(f"{type(net).__name__}.num_classes={net.num_classes} must be >= 0 (0 = unconditional).")


def check_downsampling(net: Any) -> None:
    """A UNet halves the image ``len(channel_mult) - 1`` times: the size must survive it."""
    factor = 2 ** (len(net.channel_mult) - 1)
    if net.image_size % factor != 0:
        raise ValueError(
            f"{type(net).__name__}.image_size={net.image_size} is not divisible by 2**(len(channel_mult)-1)={factor}; "
            f"use a multiple of {factor}."
        )


def check_input(net: Any, x: Any, noise_level: Any) -> None:
    """Cheap shape checks of a forward call (Python ints only, no device sync)."""
    name = type(net).__name__
    expected = (net.in_channels, net.image_size, net.image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{name} got input of shape {tuple(x.shape)} but is configured for [B, {expected[0]}, {expected[1]}, "
            f"{expected[2]}] ({name}.in_channels={net.in_channels}, {name}.image_size={net.image_size})."
        )
    if noise_level.numel() not in (1, x.shape[0]):
        raise ValueError(f"{name} noise_level has {noise_level.numel()} values for a batch of {x.shape[0]}.")


def check_data_fits_net(net: nn.Module, datamodule: Any) -> None:
    """A network given explicitly (not linked by the CLI) must take the data's channels and size."""
    for net_name, data_name in (("in_channels", "channels"), ("image_size", "image_size")):
        want, have = getattr(datamodule, data_name, None), getattr(net, net_name, None)
        if isinstance(want, int) and isinstance(have, int) and want != have:
            raise ValueError(
                f"{type(net).__name__}.{net_name}={have} does not match {type(datamodule).__name__}.{data_name}="
                f"{want}; use {net_name}={want} (the CLI links it from data.{data_name}).")
