"""``python -m lightning_diffusion`` runs the command line (needed by DDP re-launches)."""

from .cli import main

if __name__ == "__main__":
    main()
