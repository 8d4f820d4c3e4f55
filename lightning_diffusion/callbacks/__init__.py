"""Lightning callbacks: thin adapters over the pure-torch pieces; they own their checkpoint state."""

from .adaptive_timesteps import AdaptiveTimestepSampling
from .curriculum import TimestepCurriculum
from .last_checkpoint import LastCheckpoint
from .loss_aware import LossAwareTimestepSampling
from .mixture_metrics import GaussianMixtureMetrics
from .posthoc_ema import PostHocEMA
from .preemption import PreemptionCheckpoint
from .samples import SampleGrid, save_image_grid
from .wall_clock import WallClock

__all__ = ["TimestepCurriculum", "PostHocEMA", "SampleGrid", "save_image_grid", "WallClock",
           "AdaptiveTimestepSampling", "LossAwareTimestepSampling", "PreemptionCheckpoint",
           "LastCheckpoint", "GaussianMixtureMetrics"]
