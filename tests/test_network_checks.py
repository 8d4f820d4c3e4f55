"""The networks' shared configuration and input checks: one sentence naming the class and the setting."""

from __future__ import annotations

import pytest
import torch

from lightning_diffusion.networks import DiT, EDM2UNet, UNet

NETS = {"UNet": lambda: UNet(model_channels=16, attention_resolutions=()),
        "EDM2UNet": lambda: EDM2UNet(model_channels=16, attention_resolutions=()),
        "DiT": lambda: DiT(hidden_size=16, depth=1, num_heads=2)}


@pytest.mark.parametrize("name", NETS)
def test_wrong_input_shape_names_the_settings(name):
    net = NETS[name]()
    with pytest.raises(ValueError, match=rf"^{name} got input of shape \(2, 3, 8, 8\) but is configured for "
                                         rf"\[B, 1, 8, 8\] \({name}.in_channels=1, {name}.image_size=8\)\.$"):
        net(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=rf"^{name} noise_level has 3 values for a batch of 2\.$"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(3))


@pytest.mark.parametrize("name", NETS)
def test_bad_settings_name_the_class(name):
    with pytest.raises(ValueError, match=rf"^{name}.in_channels=0 must be >= 1\.$"):
        type(NETS[name]())(in_channels=0)
    with pytest.raises(ValueError, match=rf"^{name}.num_classes=-1 must be >= 0 \(0 = unconditional\)\.$"):
        type(NETS[name]())(num_classes=-1)


@pytest.mark.parametrize("cls", [UNet, EDM2UNet])
def test_unets_check_channel_mult_dropout_and_downsampling(cls):
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"^{name}.channel_mult=\(\) must be a non-empty tuple of integers >= 1\.$"):
        cls(channel_mult=())
    with pytest.raises(ValueError, match=rf"^{name}.dropout=1.0 must be in \[0, 1\)\.$"):
        cls(dropout=1.0)
    with pytest.raises(ValueError, match=rf"^{name}.image_size=6 is not divisible by 2\*\*\(len\(channel_mult\)-1\)=4; "
                                         rf"use a multiple of 4\.$"):
        cls(image_size=6, channel_mult=(1, 2, 2))
