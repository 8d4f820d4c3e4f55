"""Frechet Distance between real and generated images in a pluggable feature network's space, offline."""

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_diffusion.metrics.feature_nets import (
    INCEPTION_WEIGHTS_URL,
    InceptionFeatureNet,
    inception_weights_path,
    load_digits_feature_net,
)


class FrechetDistance(FrechetInceptionDistance):
    """FD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2) over features of real vs generated images.

    Built on torchmetrics' ``FrechetInceptionDistance`` with a custom feature net, so the feature
    sums sync across DDP ranks in ``compute()`` (call it on every rank). ``update`` takes float
    images [B,C,H,W] in [-1,1] (the range the DataModules and solvers use), clamps them there as
    saving to PNG would, and hands them to ``feature_net`` unchanged, in float32 outside autocast.

    The feature net is frozen and held *outside* the module tree: it is not in ``parameters()``
    (so never in an optimizer), not in ``state_dict()`` (so checkpoints neither grow nor depend on
    it), and ``train()`` never switches it out of eval mode; ``.to(device)`` still moves it.
    A LightningModule can therefore hold the metric as a plain attribute. Real-image statistics
    survive ``reset()`` unless ``reset_real_features=True``.

    Example::

        fd = FrechetDistance()  # digits feature net; for 1-channel images of any size
        fd.update(real_images, real=True)
        fd.update(generated_images, real=False)
        value = fd.compute()
    """

    def __init__(self, feature_net: nn.Module | None = None, reset_real_features: bool = False) -> None:
        net = load_digits_feature_net() if feature_net is None else feature_net
        if not isinstance(getattr(net, "num_features", None), int):
            raise ValueError(
                f"FrechetDistance.feature_net: {type(net).__name__} has no int attribute num_features; "
                "set it to the size of the features its forward returns."
            )
        net.requires_grad_(False).eval().float()
        # normalize only matters for torchmetrics' own Inception; a custom net gets images untouched
        super().__init__(feature=net, reset_real_features=reset_real_features, normalize=True)
        # hold the net outside _modules: out of state_dict, parameters() and train()
        del self._modules["inception"]
        object.__setattr__(self, "inception", net)
        self.orig_dtype = torch.float32  # compute() may run on a rank whose update() never ran

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of float images [B,C,H,W] in [-1,1] to the real or the generated statistics."""
        if not images.is_floating_point() or images.ndim != 4:
            raise ValueError(
                f"FrechetDistance.update: images are {images.dtype} {tuple(images.shape)}; "
                "give float [B,C,H,W] in [-1, 1]."
            )
        images = images.detach().float().clamp(-1.0, 1.0)
        # features accumulate in float64 sums; keep the net itself out of bf16/fp16 autocast
        with torch.autocast(device_type=images.device.type, enabled=False):
            super().update(images, real)

    def _apply(self, fn: Callable, exclude_state: tuple[str, ...] = ()) -> "FrechetDistance":
        """Move the hidden feature net with the metric (device moves), keeping it in float32."""
        this = super()._apply(fn, exclude_state)
        self.inception._apply(fn)
        self.inception.float()
        return this


def inception_fid_available(weights_path: str | None = None) -> bool:
    """True when torch-fidelity is installed and the Inception weights file is present (no download)."""
    return importlib.util.find_spec("torch_fidelity") is not None and inception_weights_path(weights_path).is_file()


def inception_fid(weights_path: str | None = None, reset_real_features: bool = False) -> FrechetDistance:
    """Standard Inception-v3 FID (2048 features, torch-fidelity weights) taking images in [-1,1].

    ``weights_path`` defaults to the torch hub cache (``<torch.hub.get_dir()>/checkpoints``). Never
    downloads: raises RuntimeError naming what to install when anything is missing.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        raise RuntimeError("inception_fid: torch-fidelity is not installed; run `pip install torch-fidelity`.")
    weights = inception_weights_path(weights_path)
    if not weights.is_file():
        raise RuntimeError(
            f"inception_fid.weights_path: '{weights}' does not exist; download {INCEPTION_WEIGHTS_URL} there "
            "or pass its location."
        )
    return FrechetDistance(InceptionFeatureNet(str(weights)), reset_real_features=reset_real_features)


@torch.no_grad()
def add_generated(fd: FrechetDistance, sample: Callable[..., Tensor], count: int, num_classes: int,
                  generator: torch.Generator, chunk: int = 256) -> None:
    """Generate ``count`` images with ``sample(n, class_labels=, generator=)`` (labels uniform over the
    classes when conditional) in chunks of ``chunk`` and add them to ``fd`` as the generated side."""
    device = generator.device
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        labels = torch.randint(0, num_classes, (n,), generator=generator, device=device) if num_classes else None
        fd.update(sample(n, class_labels=labels, generator=generator), real=False)
