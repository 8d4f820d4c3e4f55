"""DiffusionLightningModule: a network plus the diffusion math, composed from injectable pieces.

``training_step`` reads top to bottom: draw t -> noise -> target -> forward -> weight -> reduce
-> log. Every piece (process, prediction, weighting, timestep distribution, target, optimizer,
scheduler) is a constructor argument that YAML can set with ``class_path``; callbacks replace or
wrap ``module.timesteps`` and read per-sample losses from the ``outputs`` of ``training_step``.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from .autoencoders.space import LatentSpace
from .checkpoint_compat import check_checkpoint_fits, is_plain
from .clock import ImageClock, images_per_step, images_seen
from .divergence import DivergenceGuard, NonFiniteLossError
from .core.noise import NoiseProcess, VPProcess
from .core.perturb import check_strength, training_noise
from .core.precondition import Parametrization
from .core.seeds import stream_seed
from .core.targets import RegressionTarget, StandardTarget
from .core.weighting import ConstantWeighting, LossWeighting
from .metrics.fd import FrechetDistance, add_generated
from .networks.checks import check_data_fits_net
from .networks.mp import normalize_mp_weights_
from .networks.uncertainty import uncertainty_loss, uncertainty_noise_level
from .optim import clock_schedulers, group_settings, reapply_settings
from .protocol import StepOutput, step_output
from .sampling import DiffusionSampler
from .sharding import check_strategy, param_dtype_for, shard_module
from .timesteps import TimestepDistribution
from .timesteps.defaults import check_timesteps, default_timesteps
from .validation import bucket_means, validation_losses

__all__ = ["DiffusionLightningModule", "NonFiniteLossError"]

_STANDARD_TARGET = StandardTarget()


class DiffusionLightningModule(pl.LightningModule):
    """Train any ``net(x, noise_level, class_labels=None)`` as a diffusion model.

    Args:
        net: the network; VP processes pass the timestep index (float) as ``noise_level``, EDM
            passes ``c_noise = ln(sigma)/4`` after EDM preconditioning.
        process: ``VPProcess`` (default), ``EDMProcess`` or ``RectifiedFlowProcess``.
        prediction: ``"eps"``, ``"x0"`` or ``"v"`` (EDM: ``"x0"``, the denoiser; rectified flow: ``"flow"``,
            the velocity ``eps - x0``).
        weighting: per-sample loss weighting (default: constant, in the prediction's space).
        timesteps: training-time noise-level distribution (default: uniform t / EDM log-normal).
        target: regression target (default: the standard one).
        optimizer, lr_scheduler: callables that build them (``class_path`` in YAML).
        num_classes: 0 for unconditional; else labels ``0..num_classes-1`` and null label ``num_classes``.
        label_dropout: probability of replacing a label with the null label (classifier-free guidance).
        seed: seed of the per-rank, per-step noise streams (resumable: keyed by the step counter); the
            global torch RNG is reseeded from it before each training step, so dropout resumes exactly too.
        val_levels: size of the fixed noise-level grid of the validation loss.
        val_seed: seed of the fixed validation noise.
        compile: compile the network with ``torch.compile``: ``True`` with its default backend
            (inductor), or a backend's name (``"inductor"``, ``"aot_eager"``, ``"cudagraphs"``...).
        sample_steps, sample_solver: defaults of :meth:`sample`.
        fd_samples: generate this many images (over all ranks) at each validation and log the
            Frechet distance to the validation images as ``val/fd``; 0 turns it off.
        fd_feature_net: feature network of the FD (default: the shipped digits classifier).
        uncertainty: EDM2 learned uncertainty head (e.g. ``UncertaintyHead()``, docs/algorithms.md 3.2):
            the training loss becomes ``weight * mse * exp(-u) + u`` per sample, with ``u`` read from
            :func:`uncertainty_noise_level` in fp32; it trains with the network's optimizer.
            ``per_sample_loss`` (for callbacks) and ``val/loss`` stay ``weight * mse`` without ``u``,
            so they compare across runs with and without it.
        offset_noise: strength ``c`` of offset noise (Guttenberg 2023; docs/algorithms.md 6): the noise
            gains ``c * delta`` with ``delta ~ N(0, 1)`` per sample and channel, constant over pixels, in
            the noisy input and in the target alike. 0 (default) turns it off; 0.1 is the usual value.
        input_perturbation: strength ``g`` of input perturbation (Ning et al. 2023): the noisy input is
            built from ``eps + g xi`` while the target keeps ``eps``. 0 turns it off; the paper uses 0.1.
        check_finite: stop with :class:`NonFiniteLossError` (naming the optimizer step and the last
            good checkpoint) once the training loss or the weights are nan/inf, and never write a
            checkpoint of non-finite weights. The loss is recorded on the device every step (no host
            sync) and read on logging steps, before each checkpoint and before each validation.
            Under ``16-mixed`` precision only the weights count (the grad scaler skips inf steps).

    Example::

        module = DiffusionLightningModule(UNet(in_channels=1, image_size=8), prediction="v",
                                          weighting=MinSNRWeighting(gamma=5.0))
        pl.Trainer(max_steps=1000).fit(module, datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        net: nn.Module,
        process: NoiseProcess | None = None,
        prediction: str = "eps",
        weighting: LossWeighting | None = None,
        timesteps: TimestepDistribution | None = None,
        target: RegressionTarget | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        seed: int = 0,
        val_levels: int = 8,
        val_seed: int = 1234,
        compile: bool | str = False,
        sample_steps: int = 32,
        sample_solver: str = "heun",
        fd_samples: int = 0,
        fd_feature_net: nn.Module | None = None,
        uncertainty: nn.Module | None = None,
        offset_noise: float = 0.0,
        input_perturbation: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        # Keep only plain values: checkpoints must load with torch.load(weights_only=True). Under
        # LightningCLI every argument arrives as its plain config, so load_from_checkpoint works.
        with warnings.catch_warnings():  # the nn.Module arguments are dropped right below
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        for key in [k for k, v in self.hparams.items() if not is_plain(v)]:
            del self.hparams[key]
        self.net = net
        self.uncertainty = uncertainty  # a submodule: self.parameters() hands it to the optimizer
        self.process = process if process is not None else VPProcess()
        self.param = Parametrization(self.process, prediction)
        self.prediction = prediction
        self.weighting = weighting if weighting is not None else ConstantWeighting()
        if hasattr(self.weighting, "bind"):  # sigma-based weightings read sigma_data and the SNR reference
            self.weighting.bind(self.process)
        self.timesteps = timesteps if timesteps is not None else default_timesteps(self.process)
        check_timesteps(self.timesteps, self.process)
        self.target = target if target is not None else StandardTarget()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0 means unconditional).")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout} must be in [0, 1).")
        if val_levels < 1:
            raise ValueError(f"val_levels={val_levels} must be >= 1.")
        self.offset_noise = check_strength("offset_noise", offset_noise)
        self.input_perturbation = check_strength("input_perturbation", input_perturbation)
        self.num_classes, self.label_dropout = num_classes, label_dropout
        self.seed, self.val_levels, self.val_seed = seed, val_levels, val_seed
        self.sampler = DiffusionSampler(self.param, sample_steps, sample_solver)
        if isinstance(compile, str):
            import torch._dynamo  # only when a backend is named: importing Dynamo takes a moment

            backends = torch._dynamo.list_backends(exclude_tags=())
            if compile not in backends:
                raise ValueError(f"compile={compile!r} is not a torch.compile backend; give true, false or one of "
                                 f"{backends}.")
        self.compile_net = compile
        if fd_samples < 0:
            raise ValueError(f"fd_samples={fd_samples} must be >= 0 (0 turns the FD off).")
        self.fd_samples = fd_samples
        # Metric states and the frozen feature net stay out of state_dict (see FrechetDistance).
        self.fd = FrechetDistance(fd_feature_net) if fd_samples else None
        # Counters restored from checkpoints: they key the random streams and the clock.
        self.draws = 0
        self.batch_size_per_device = 0
        self.image_shape: tuple[int, ...] | None = None
        # Latent diffusion (docs/latents.md): the autoencoder and normalization the data came through,
        # from a LatentDataModule at setup or from the checkpoint; a plain attribute, so the frozen
        # autoencoder stays out of state_dict and the optimizer.
        self.latent_space: LatentSpace | None = None
        self._generator: torch.Generator | None = None
        self.check_finite = check_finite
        self.divergence = DivergenceGuard(check_finite)
        self._optimizer_settings: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup and state
    def configure_model(self) -> None:
        # FSDP2 (docs/sharding.md): under FSDP2Strategy / ModelParallelStrategy Lightning sets a device
        # mesh; the network and the uncertainty head are sharded per block, then per root, before compile.
        if self._device_mesh is not None and self._trainer is not None:
            shard_module(self, self._device_mesh, (self.net, self.uncertainty), param_dtype_for(self.trainer))
        # In-place nn.Module.compile keeps state_dict keys unchanged (no "_orig_mod." prefix).
        if self.compile_net and getattr(self.net, "_compiled_call_impl", None) is None:
            backend = self.compile_net if isinstance(self.compile_net, str) else "inductor"
            self.net.compile(backend=backend)

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            check_strategy(self._trainer.strategy, type(self).__name__)  # MP layers need real parameters
            ImageClock.attach(self._trainer)  # the one clock every schedule reads (clock.py)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        check_data_fits_net(self.net, datamodule)
        if getattr(datamodule, "latent_space", None) is not None:
            self._use_latent_space(datamodule.latent_space, "the data")
        # Targets that need the run (STF's reference stream, DDP gathers) attach to it here.
        if hasattr(self.target, "setup"):
            self.target.setup(self)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(p for p in self.parameters() if p.requires_grad)
        self._optimizer_settings = group_settings(optimizer)  # before a scheduler changes lr (reapplied on resume)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if getattr(scheduler, "wants_image_clock", False):  # EDM2LRScheduler without a batch_size
            scheduler.attach_image_clock(self._images_per_step_for(f"{type(scheduler).__name__}.batch_size"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _images_per_step_for(self, setting: str) -> int:
        try:
            return images_per_step(self.trainer)  # this layout's, until the clock measured a step
        except RuntimeError as error:
            raise ValueError(f"{setting} could not be read from the trainer (the DataModule has no batch_size); "
                             f"give the images per optimizer step over all devices.") from error

    def on_train_start(self) -> None:
        self.divergence.reset()  # a new fit (e.g. with a lower learning rate) starts clean
        # A resume restored the checkpoint's optimizer settings over this run's: put this run's back
        # (e.g. the lower learning rate the divergence message advises), and say so.
        if self.trainer.ckpt_path and self._optimizer_settings and len(self.trainer.optimizers) == 1:
            schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
            notes = reapply_settings(self.trainer.optimizers[0], self._optimizer_settings, schedulers)
            if notes:
                rank_zero_info(f"Resumed with this run's optimizer settings: {'; '.join(notes)}")
        # A resumed run may use other devices/nodes/accumulation: schedules that follow the image
        # clock continue from its counted images, at this layout's images per step (clock.py).
        schedulers = clock_schedulers(self.trainer.lr_scheduler_configs)
        if schedulers:
            per_step = self._images_per_step_for("EDM2LRScheduler.batch_size")
            for scheduler in schedulers:
                scheduler.follow(images_seen(self.trainer), per_step)
                scheduler.set_batch_size(per_step)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Forced weight normalization (docs/algorithms.md 3.1) once per real optimizer step, right after
        # it (Lightning calls this once per accumulation window). Not in on_before_zero_grad:
        # Lightning zeroes grads after the forward, and an in-place write to weights the graph
        # saved would break the backward that follows.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.normalize_weights_()
        # Lightning steps the schedulers next (before on_train_batch_end): the EDM2 rate of the next
        # step reads the counted clock, which has just credited this step's images.
        clock, schedulers = ImageClock.find(self.trainer), clock_schedulers(self.trainer.lr_scheduler_configs)
        if clock is not None and schedulers:
            nimg = clock.settle(self.trainer, step=self.trainer.global_step + 1)  # Lightning counts it after this hook
            for scheduler in schedulers:
                scheduler.follow(nimg, clock.images_per_step or scheduler.batch_size)

    def normalize_weights_(self) -> None:
        """Forced weight normalization of the MP layers of ``net`` and ``uncertainty`` (docs/algorithms.md 3.1)."""
        normalize_mp_weights_(self.net, self.uncertainty)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called while the checkpoint is assembled, before any byte is written: raising here keeps
        # every checkpoint of the run finite (ModelCheckpoint included).
        self.divergence.check(self, weights=True)
        checkpoint["diffusion"] = {
            "draws": self.draws,
            "batch_size_per_device": self.batch_size_per_device,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "timesteps": self.timesteps.state_dict(),
            "target": self.target.state_dict() if hasattr(self.target, "state_dict") else {},
            "latents": self.latent_space.state() if self.latent_space is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A Trainer restore (--ckpt_path) calls this before loading the weights: a checkpoint of
        # another model is one sentence, not a list of every mismatched tensor. load_from_checkpoint
        # (no trainer, maybe strict=False on purpose) and strict_loading=False are left alone.
        if self._trainer is not None and self.strict_loading:
            check_checkpoint_fits(self, checkpoint)
        state = checkpoint.get("diffusion")
        if state is None:
            return
        self.draws = int(state["draws"])
        self.batch_size_per_device = int(state["batch_size_per_device"])
        self.image_shape = tuple(state["image_shape"]) if state["image_shape"] else None
        self.timesteps.load_state_dict(state["timesteps"])
        if hasattr(self.target, "load_state_dict") and state.get("target"):
            self.target.load_state_dict(state["target"])
        latents = state.get("latents")
        # the data's space equal to the checkpoint's (every resume) is kept: no second load of the autoencoder
        if latents and (self.latent_space is None or self.latent_space.state() != latents):
            self._use_latent_space(LatentSpace.from_state(latents), "the checkpoint")

    def _use_latent_space(self, space: LatentSpace, origin: str) -> None:
        """Decode through ``space`` from now on; refuse one that disagrees with what the model trained on."""
        if self.latent_space is not None and not self.latent_space.same_as(space):
            raise ValueError(f"Latent space: {origin} uses {space.state()} but this model has "
                             f"{self.latent_space.state()}; train and evaluate on latents of the same encode.")
        self.latent_space = space

    def decoded(self, x: Tensor) -> Tensor:
        """Images from the model's data: decoded latents when it trains in a latent space, else ``x``."""
        return x if self.latent_space is None else self.latent_space.decode(x)

    @property
    def images_seen(self) -> int:
        """Images seen globally (the one clock, :func:`lightning_diffusion.clock.images_seen`)."""
        return images_seen(self.trainer)

    def step_generator(self, device: torch.device, key: int) -> torch.Generator:
        """A generator seeded from (seed, global rank, key): different per rank, exact on resume."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self._stream_seed(key))
        return self._generator

    def _stream_seed(self, key: int) -> int:
        """Distinct 63-bit seeds per (seed, global rank, key) (:func:`~lightning_diffusion.core.seeds.stream_seed`)."""
        return stream_seed(self.seed, self.global_rank if self._trainer is not None else 0, key)

    # ------------------------------------------------------------------ training
    def unpack(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """Images and (if the module is class-conditional) labels from a batch."""
        x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
        labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if self.num_classes == 0:
            labels = None
        if self.image_shape is None:
            self.image_shape = tuple(x0.shape[1:])
        return x0, labels

    def drop_labels(self, labels: Tensor | None, generator: torch.Generator) -> Tensor | None:
        """Replace labels by the null label ``num_classes`` with probability ``label_dropout``."""
        if labels is None or self.label_dropout == 0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def weighted_mse(
        self, x0: Tensor, noise: Tensor, level: Tensor, labels: Tensor | None,
        target: RegressionTarget | None = None, data_labels: Tensor | None = None,
        input_noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """noise -> target -> forward -> weight at given levels: ``(output, x_noisy, mse, weight)``.

        ``target`` defaults to the standard (per-sample) target, so validation and look-ahead
        evaluations measure the true objective; training passes ``self.target`` (e.g. STF).
        ``labels`` condition the network; ``data_labels`` (training: the labels before guidance
        dropout) reach the target, whose references keep their true classes (docs/algorithms.md 2).
        ``input_noise`` (input perturbation) replaces ``noise`` in the noisy input only.
        """
        x_noisy = self.process.add_noise(x0, noise if input_noise is None else input_noise, level)
        with torch.no_grad():
            true_labels = {} if data_labels is None else {"data_labels": data_labels}
            target = (target or _STANDARD_TARGET)(self.param, x0, noise, x_noisy, level, labels, **true_labels)
        output = self.param.predict(self.net, x_noisy, level, labels)
        mse = (output.float() - target.float()).square().flatten(1).mean(1)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            weight = self.weighting(self.process.snr(level), self.prediction)
        return output, x_noisy, mse, weight

    @torch.no_grad()
    def lookahead_loss(self, x0: Tensor, noise: Tensor, level: Tensor, labels: Tensor | None) -> Tensor:
        """Protocol (docs/callbacks.md): per-sample ``weight * mse`` at given levels, standard target, fp32."""
        _, _, mse, weight = self.weighted_mse(x0, noise, level, labels)
        return (weight * mse).float()

    @torch.no_grad()
    def denoise(self, x_noisy: Tensor, level: Tensor, labels: Tensor | None) -> Tensor:
        """Protocol (docs/callbacks.md): the network's estimate of the clean data at ``level``."""
        output = self.param.predict(self.net, x_noisy, level, labels)
        return self.param.to_x0(output.float(), x_noisy.float(), level)

    def diffusion_loss(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator
    ) -> StepOutput:
        """One training draw: per-sample weighted losses and what produced them."""
        level, importance = self.timesteps.sample(x0.shape[0], x0.device, generator, x0=x0, labels=labels)
        noise, input_noise = training_noise(x0, generator, self.offset_noise, self.input_perturbation)
        net_labels = self.drop_labels(labels, generator)  # dropout hides labels from the network only
        _, _, mse, weight = self.weighted_mse(x0, noise, level, net_labels, target=self.target, data_labels=labels,
                                              input_noise=input_noise)
        per_sample = weight * mse
        trained = per_sample
        if self.uncertainty is not None:
            with torch.autocast(device_type=x0.device.type, enabled=False):
                u = self.uncertainty(uncertainty_noise_level(self.process, level)).float()
            trained = uncertainty_loss(per_sample, u)  # docs/algorithms.md 3.2
        loss = (trained * importance).mean()
        return step_output(loss, per_sample, level, importance, mse=mse.detach())

    def training_step(self, batch: Any, batch_idx: int) -> StepOutput:
        x0, labels = self.unpack(batch)
        self.batch_size_per_device = x0.shape[0]
        generator = self.step_generator(x0.device, self.draws)
        # The global RNG too (dropout, a user's own randomness): checkpoints do not carry it, so it is
        # keyed like the draws (another stream: the seed's top bit flipped) and resumes exactly.
        torch.manual_seed(self._stream_seed(self.draws) ^ (1 << 62))
        self.draws += 1
        out = self.diffusion_loss(x0, labels, generator)
        self.divergence.record(out["loss"], self.global_step + 1, self.trainer.precision)
        # Log only on the steps Lightning writes ((step + 1) % n == 0): no per-step logging cost,
        # no per-step .item() host sync from the progress bar, and bucket values never stale.
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.divergence.check(self, weights=False)  # Lightning syncs on these steps anyway
            self.log("train/loss", out["loss"], prog_bar=True)
            for k, mean in bucket_means(self.process, out["level"], out["per_sample_loss"]).items():
                self.log(f"train/loss_bucket{k}", mean)
        return out

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x0, labels = self.unpack(batch)
        # Fixed noise, independent of the training streams and of how long training ran.
        generator = torch.Generator(device=x0.device).manual_seed(
            self.val_seed * 1_000_003 + batch_idx * 1009 + self.global_rank)
        losses = validation_losses(self, x0, labels, generator)
        if self.fd is not None:
            self.fd.update(self.decoded(x0).clamp(-1, 1), real=True)
        for name, value in losses.items():
            self.log(f"val/{name}", value, sync_dist=True, prog_bar=name == "loss", batch_size=x0.shape[0])
        return losses

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.divergence.check(self, weights=True)  # no sampling and FD from nan weights
        if self.fd is not None:
            self.fd.reset()

    def on_validation_epoch_end(self) -> None:
        if self.fd is None or self.trainer.sanity_checking:
            return
        # Every rank generates its share and computes: the metric all-reduces its sums.
        per_rank = -(-self.fd_samples // self.trainer.world_size)
        generator = torch.Generator(device=self.device).manual_seed(self.val_seed + 7 * self.global_rank)
        add_generated(self.fd, self.sample, per_rank, self.num_classes, generator)
        self.log("val/fd", self.fd.compute(), prog_bar=True, sync_dist=False)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.validation_step(batch, batch_idx)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        class_labels: Tensor | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        shape: tuple[int, ...] | None = None,
        clamp: bool = True,
        decode: bool = True,
    ) -> Tensor:
        """Generate ``num_samples`` images with the chosen solver, clamped to [-1, 1] unless ``clamp=False``.

        A latent model (``latent_space`` set) returns decoded images unless ``decode=False`` (then the
        normalized latents, never clamped); ``shape`` is the latents' shape.
        """
        shape = shape or self.image_shape
        if shape is None:
            raise ValueError("sample needs shape=(C, H, W): this module has not seen a batch yet.")
        if class_labels is not None and self.num_classes == 0:
            raise ValueError("class_labels were given but num_classes=0 (an unconditional model).")
        was_training = self.training
        self.eval()
        try:
            x = self.sampler.sample(self.net, num_samples, tuple(shape), self.device, class_labels,
                                    self.num_classes, num_steps, solver, guidance, generator)
        finally:
            self.train(was_training)
        if self.latent_space is not None:
            if not decode:
                return x
            x = self.latent_space.decode(x)
        return x.clamp(-1, 1) if clamp else x

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = self.unpack(batch)
        generator = torch.Generator(device=self.device).manual_seed(self.val_seed + batch_idx * 7919 + self.global_rank)
        return self.sample(x0.shape[0], class_labels=labels, generator=generator)

