"""Train DigitsAutoencoder on all embedded digits; writes lightning_diffusion/autoencoders/assets/digits_autoencoder.pt.

Fixed seed, CPU, one thread, about a minute:

    python scripts/train_digits_autoencoder.py

Trains on all 1,797 digits (the autoencoder is a fixed codec for the data set, not a model judged
on held-out images), with reconstruction MSE plus a small KL weight as Stable Diffusion's KL-f
autoencoders do: reconstruction dominates, and the KL term keeps the latents near unit scale and
the posterior std away from 0, so a diffusion model sees a smooth latent space. Prints the
reconstruction MSE, the posterior std relative to the latent scale, and how often the shipped
digits classifier recognises reconstructions (decoded from the mean) vs the originals. Saves the
float32 state dict atomically (loaded back with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_diffusion.autoencoders.digits import DIGITS_AUTOENCODER_WEIGHTS, DigitsAutoencoder, DigitsAutoencoderNet
from lightning_diffusion.data.embedded import DIGITS_PATH
from lightning_diffusion.io import atomic_write
from lightning_diffusion.metrics.feature_nets import load_digits_feature_net

EPOCHS = 150
BATCH_SIZE = 64
KL_WEIGHT = 1e-3  # per latent number, against the per-pixel MSE; tuned so std/scale lands in ~0.05-0.3
SEED = 0


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as float [-1,1] ``[N,1,8,8]`` and their labels."""
    # allow_pickle=False: the asset is plain arrays, and a swapped file must not run code
    with np.load(DIGITS_PATH, allow_pickle=False) as archive:
        images = torch.from_numpy(archive["images"]).unsqueeze(1).float() / 127.5 - 1.0
        labels = torch.from_numpy(archive["labels"]).long()
    return images, labels


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel (background -1 fills the gap), so the decoder covers slightly moved digits."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


@torch.no_grad()
def evaluate(autoencoder: DigitsAutoencoder, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Reconstruction MSE, std relative to latent scale, classifier accuracy on reconstructions and originals."""
    classifier = load_digits_feature_net()
    mean, std = autoencoder.encode(images)
    reconstructions = autoencoder.decode(mean)
    return {
        "mse": F.mse_loss(reconstructions, images).item(),
        "latent_scale": mean.std().item(),
        "mean_std": std.mean().item(),
        "accuracy_reconstructed": (classifier.classify(reconstructions).argmax(1) == labels).float().mean().item(),
        "accuracy_original": (classifier.classify(images).argmax(1) == labels).float().mean().item(),
    }


def train(epochs: int, kl_weight: float, augment: bool) -> DigitsAutoencoderNet:
    """AdamW + cosine decay on reconstruction MSE + kl_weight * KL (both averaged per number)."""
    images, _ = load_digits()
    net = DigitsAutoencoderNet()
    steps_per_epoch = -(-len(images) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        totals = torch.zeros(2)
        for index in order.split(BATCH_SIZE):
            batch = images[index]
            # half the batches shifted: the originals stay the main target, which the MSE is judged on
            if augment and torch.rand((), generator=generator) < 0.5:
                batch = shift(batch, generator)
            mean, logvar = net.moments(batch)
            latents = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
            reconstruction = F.mse_loss(net.decode(latents), batch)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
            loss = reconstruction + kl_weight * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            totals += torch.tensor([reconstruction.item(), kl.item()])
        if (epoch + 1) % 10 == 0 or epoch == 0:
            mse, kl = (totals / steps_per_epoch).tolist()
            print(f"epoch {epoch + 1:4d}/{epochs}  mse {mse:.5f}  kl {kl:.3f}  {time.perf_counter() - start:5.1f} s",
                  flush=True)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DIGITS_AUTOENCODER_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--kl-weight", type=float, default=KL_WEIGHT)
    parser.add_argument("--no-augment", action="store_true", help="train on the digits as they are")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    # a tiny net gains nothing from threads, and on a shared CPU they can slow it many times over
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    net = train(args.epochs, args.kl_weight, augment=not args.no_augment)
    seconds = time.perf_counter() - start
    state = {name: tensor.detach().float().contiguous() for name, tensor in net.state_dict().items()}
    atomic_write(args.out, lambda f: torch.save(state, f))
    autoencoder = DigitsAutoencoder(str(args.out)).frozen()  # read back the way users will
    images, labels = load_digits()
    result = evaluate(autoencoder, images, labels)
    print(f"params {sum(p.numel() for p in net.parameters())}, trained in {seconds:.0f} s on {len(images)} digits")
    print(f"reconstruction MSE {result['mse']:.5f} (decoding the mean); posterior std {result['mean_std']:.4f} "
          f"vs latent scale {result['latent_scale']:.3f} (ratio {result['mean_std'] / result['latent_scale']:.3f})")
    print(f"classifier accuracy: reconstructions {result['accuracy_reconstructed']:.4f}, "
          f"originals {result['accuracy_original']:.4f}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
