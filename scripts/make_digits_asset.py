"""Write lightning_diffusion/data/assets/digits.npz from scikit-learn's embedded digits.

The source is the UCI "Optical Recognition of Handwritten Digits" test set as shipped inside
scikit-learn (1,797 real 8x8 grey digits, values 0..16, 10 classes; CC BY 4.0). The library
reads the npz at run time, so scikit-learn is needed only to (re)build the asset:

    python scripts/make_digits_asset.py
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "lightning_diffusion" / "data" / "assets" / "digits.npz"


def main() -> None:
    """Scale 0..16 to 0..255, store uint8 images [N,8,8] and labels [N]."""
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): images {images.shape}, labels {labels.shape}")


if __name__ == "__main__":
    main()
