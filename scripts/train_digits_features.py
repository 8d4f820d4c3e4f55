"""Train DigitsFeatureNet on the embedded digits and write lightning_diffusion/metrics/assets/digits_features.pt.

Fixed seed, CPU, well under a minute:

    python scripts/train_digits_features.py

Trains on the DigitsDataModule train split (seed 0, 20% held out), prints held-out accuracy,
and saves the state dict (loaded back with ``torch.load(weights_only=True)``).
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.metrics.feature_nets import DIGITS_WEIGHTS, DigitsFeatureNet

EPOCHS = 40
SEED = 0


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel (background -1 fills the gap): cheap augmentation for 8x8 digits."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


@torch.no_grad()
def accuracy(net: DigitsFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images classified correctly."""
    return (net.classify(images).argmax(1) == labels).float().mean().item()


def main(out: Path = DIGITS_WEIGHTS) -> None:
    """Train with AdamW + cosine decay, report accuracy, save float32 weights."""
    torch.manual_seed(SEED)
    # a 40k-parameter net gains nothing from threads, and on a shared CPU they can slow it 50x
    torch.set_num_threads(1)
    data = DigitsDataModule(batch_size=64, val_fraction=0.2, seed=SEED)
    test_images = torch.stack([image for image, _ in data.val_dataset])
    test_labels = data.val_dataset.labels
    net = DigitsFeatureNet()
    steps = EPOCHS * (len(data.train_dataset) // data.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for images, labels in data.train_dataloader():
            loss = F.cross_entropy(net.classify(shift(images, generator)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    print(
        f"params {sum(p.numel() for p in net.parameters())}, held-out accuracy "
        f"{accuracy(net, test_images, test_labels):.4f} on {len(test_labels)} images"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
