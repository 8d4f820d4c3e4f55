"""Power-function EMA, snapshots and post-hoc reconstruction (docs/algorithms.md 3.4-3.5); pure torch."""

from .power_ema import PowerFunctionEMA
from .profiles import (MAX_SIGMA_REL, check_sigma_rel, gamma_to_sigma_rel, power_function_beta,
                       profile_inner_product, sigma_rel_to_gamma, solve_posthoc_coefficients)
from .shard_files import shard_header, shard_snapshot_name
from .snapshots import (list_snapshots, load_manifest, load_snapshot, reconstruct, save_snapshot, snapshot_name,
                        write_manifest)

__all__ = ["MAX_SIGMA_REL", "PowerFunctionEMA", "check_sigma_rel", "gamma_to_sigma_rel", "list_snapshots",
           "load_manifest", "load_snapshot", "power_function_beta", "profile_inner_product", "reconstruct",
           "save_snapshot", "shard_header", "shard_snapshot_name", "sigma_rel_to_gamma", "snapshot_name", "solve_posthoc_coefficients", "write_manifest"]
