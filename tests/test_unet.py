"""The default UNet: shapes, zero init, conditioning, clear errors, autocast, torch.compile."""

import pytest
import torch
from torch import nn

from lightning_diffusion.networks import UNet


def _randomize_zero_layers(net: nn.Module) -> nn.Module:
    """Give the zero-initialized layers random weights so every input path reaches the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return net


@pytest.mark.parametrize(
    ("channels", "image_size", "channel_mult", "attention_resolutions"),
    [(1, 8, (1, 2), (4,)), (3, 16, (1, 2, 2), (8, 4)), (3, 32, (1, 2), (16,)), (1, 64, (1, 1, 2, 2), (8,))],
)
def test_output_shape(channels, image_size, channel_mult, attention_resolutions):
    net = UNet(in_channels=channels, image_size=image_size, model_channels=16, channel_mult=channel_mult,
               attention_resolutions=attention_resolutions)
    x = torch.randn(2, channels, image_size, image_size)
    assert net(x, torch.tensor([3.0, 900.0])).shape == x.shape


def test_out_channels_and_scalar_noise_level():
    net = UNet(in_channels=3, out_channels=6, image_size=8)
    assert net(torch.randn(2, 3, 8, 8), torch.tensor(0.5)).shape == (2, 6, 8, 8)


def test_zero_at_init_nonzero_after_one_step():
    torch.manual_seed(0)
    net = UNet(num_classes=10)
    x, t = torch.randn(8, 1, 8, 8), torch.rand(8) * 999
    assert torch.equal(net(x, t), torch.zeros_like(x))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ((net(x, t) - torch.randn_like(x)) ** 2).mean().backward()
    opt.step()
    assert net(x, t).abs().max() > 0


@pytest.mark.parametrize("noise_levels", [(3.0, 700.0), (-1.2, 0.9)])  # VP index and EDM c_noise ranges
def test_noise_level_changes_output(noise_levels):
    net = _randomize_zero_layers(UNet()).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    out = net(x, torch.tensor(noise_levels))
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_class_labels_change_output_and_null_label():
    net = _randomize_zero_layers(UNet(num_classes=10)).eval()
    x, t = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1), torch.full((3,), 10.0)
    out = net(x, t, torch.tensor([0, 7, 10]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[0] - out[2]).abs().max() > 1e-4
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((3,), 10)))  # None means null class


def test_class_labels_ignored_when_unconditional():
    net = _randomize_zero_layers(UNet(num_classes=0)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(net(x, t, torch.tensor([0, 1])), net(x, t))


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"image_size": 10, "channel_mult": (1, 2, 2)}, "UNet.image_size=10"),
        ({"model_channels": 20}, "UNet.num_groups=8"),
        ({"in_channels": 0}, "UNet.in_channels=0"),
        ({"out_channels": 0}, "UNet.out_channels=0"),
        ({"channel_mult": ()}, "UNet.channel_mult"),
        ({"num_heads": 3}, "UNet.num_heads=3"),
        ({"dropout": 1.0}, "UNet.dropout=1.0"),
        ({"num_classes": -1}, "UNet.num_classes=-1"),
    ],
)
def test_bad_config_names_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        UNet(**kwargs)


def test_image_size_error_message():
    with pytest.raises(ValueError) as err:
        UNet(image_size=10, channel_mult=(1, 2, 2))
    assert str(err.value) == "UNet.image_size=10 is not divisible by 2**(len(channel_mult)-1)=4; use a multiple of 4."


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 8, 8), (1, 8, 8)])
def test_wrong_input_shape_names_setting(shape):
    with pytest.raises(ValueError, match="UNet.image_size=8"):
        UNet()(torch.randn(shape), torch.zeros(shape[0]))


def test_bf16_autocast_forward_backward():
    net = _randomize_zero_layers(UNet(num_classes=10))
    x = torch.randn(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.rand(4) * 999, torch.tensor([0, 1, 2, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_default_parameter_count():
    assert sum(p.numel() for p in UNet().parameters()) < 1_000_000


@pytest.mark.slow
def test_compile_matches_eager():
    net = _randomize_zero_layers(UNet(num_classes=10)).eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 999, torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net)(x, t, y), net(x, t, y), rtol=1e-4, atol=1e-4)
