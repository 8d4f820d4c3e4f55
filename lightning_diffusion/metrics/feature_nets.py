"""Feature networks for Frechet Distance; each takes float images in [-1,1] and returns [B, num_features]."""

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIGITS_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digits_features.pt"
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"


class DigitsFeatureNet(nn.Module):
    """Small CNN classifier for 8x8 grey digits whose 64-dim penultimate layer serves as FD features.

    ``forward`` takes [B,1,H,W] in [-1,1], area-resizes to 8x8 if needed (so 16x16 or 32x32 samples
    of the upsampled digits work), and returns the features; ``classify`` returns the 10 logits.
    Resizing is not lossless: compare generated images with real ones at the same resolution.
    The features are taken before the ReLU so no unit is dead and the covariance stays full rank.

    Example::

        net = load_digits_feature_net()
        features = net(images)  # [B, 64]
    """

    num_features: int = 64

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Penultimate features [B, 64] of images [B,1,H,W] in [-1,1]."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"DigitsFeatureNet: images have shape {tuple(images.shape)}; give [B,1,H,W] grey images.")
        if images.shape[-2:] != (8, 8):
            # block averages: for 16 or 32 this undoes the upsampling as closely as a linear map can
            images = F.interpolate(images, size=(8, 8), mode="area")
        x = F.relu(self.conv1(images))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)  # 4x4
        x = F.avg_pool2d(F.relu(self.conv3(x)), 2)  # 2x2
        return self.fc(x.flatten(1))

    def classify(self, images: Tensor) -> Tensor:
        """Class logits [B, 10]; used to train the net and check its accuracy."""
        return self.head(F.relu(self(images)))


def load_digits_feature_net(path: str | None = None) -> DigitsFeatureNet:
    """The shipped (or given) digits weights, loaded safely, frozen and in eval mode."""
    file = Path(path) if path is not None else DIGITS_WEIGHTS
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"load_digits_feature_net.path: '{file}' does not exist; run scripts/train_digits_features.py to write it."
        ) from error
    except pickle.UnpicklingError as error:  # weights_only refused a global: the file may be crafted
        raise ValueError(
            f"load_digits_feature_net.path: '{file}' is not a plain tensor state dict ({error})."
        ) from error
    net = DigitsFeatureNet()
    net.load_state_dict(state)
    return net.requires_grad_(False).eval()


def inception_weights_path(path: str | None = None) -> Path:
    """Where the torch-fidelity Inception weights are read from: the given path, else the torch hub cache."""
    return Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


class InceptionFeatureNet(nn.Module):
    """torch-fidelity's Inception-v3 (2048-dim pool features, as in published FIDs) fed [-1,1] images.

    Images are quantized to uint8 like saved PNGs, grey images repeated to RGB, and resized to
    299x299 inside. Needs ``pip install torch-fidelity`` and the weights file; build it through
    ``lightning_diffusion.metrics.inception_fid()``, which checks both first.

    Example::

        fid = FrechetDistance(InceptionFeatureNet("weights-inception-2015-12-05-6726825d.pth"))
    """

    num_features: int = 2048

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3  # import here: needs torch-fidelity

        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=str(inception_weights_path(weights_path)),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Pool features [B, 2048] of images [B,1|3,H,W] in [-1,1]."""
        pixels = ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.inception(pixels)
