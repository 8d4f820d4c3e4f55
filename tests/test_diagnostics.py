"""HostSyncCounter: counts exactly the ops that stall the host on a GPU, on a CPU run, backward included."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.diagnostics import HostSyncCounter, host_side_tensors
from lightning_diffusion.networks import UNet


def test_counts_scalar_reads_and_value_dependent_shapes():
    x = torch.randn(16)
    with HostSyncCounter() as syncs:
        y = (x * 2 + 1).exp().sum()  # device-side only
        assert syncs.count == 0
        y.item()
        float(y)
        bool(y > 0)
        x[x > 0]  # boolean mask: nonzero inside the kernel
        torch.nonzero(x)
        x.unique()
    assert syncs.by_op["_local_scalar_dense"] == 3
    assert syncs.count == 6, syncs.summary()
    assert "nonzero x1" in syncs.summary()


def test_integer_indexing_and_repeat_interleave_with_size_do_not_count():
    x, idx = torch.randn(8), torch.tensor([0, 3, 5])
    with HostSyncCounter() as syncs:
        x[idx]
        x.repeat_interleave(2, output_size=16)
    assert syncs.count == 0, syncs.summary()
    with HostSyncCounter() as syncs:
        x.repeat_interleave(torch.full((8,), 2))  # output length read from the repeats
    assert syncs.count == 1


def test_backward_is_counted():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            grad.max().item()  # a sync hidden in a backward pass
            return grad

    x = torch.randn(4, requires_grad=True)
    with HostSyncCounter() as syncs:
        ReadsInBackward.apply(x).sum().backward()
    assert syncs.count == 1, syncs.summary()


def test_the_library_training_step_has_no_host_sync():
    """Forward, loss, backward and optimizer step of DiffusionLightningModule: zero syncs per step."""

    class Probe(pl.Callback):  # counts steps 2 and 3 (after Lightning's first-step setup)
        def __init__(self):
            self.counter = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                # Adam's step counters stay on the host on a GPU too: reading them is no sync.
                self.counter = HostSyncCounter(ignore=host_side_tensors(trainer.optimizers)).__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                self.counter.__exit__(None, None, None)

    torch.manual_seed(0)
    module = DiffusionLightningModule(UNet(in_channels=1, image_size=8, model_channels=16), prediction="v")
    probe = Probe()
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, callbacks=[probe], log_every_n_steps=50,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert probe.counter is not None and probe.counter.count == 0, probe.counter.summary()


def test_optimizer_step_counters_are_host_side_and_ignored():
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(net.parameters(), foreach=False)
    for counted in (True, False):
        net(torch.randn(2, 4)).sum().backward()
        opt.step()  # the first creates the state; the second reads each step counter with .item()
    with HostSyncCounter() as plain:
        opt.step()
    with HostSyncCounter(ignore=host_side_tensors([opt])) as aware:
        opt.step()
    assert plain.count == 2 and aware.count == 0  # weight and bias


def test_compile_takes_a_backend_name_and_refuses_an_unknown_one():
    module = DiffusionLightningModule(UNet(in_channels=1, image_size=8, model_channels=16), compile="eager")
    module.configure_model()
    assert module.net._compiled_call_impl is not None
    with pytest.raises(ValueError, match=r"compile='indcutor' is not a torch.compile backend"):
        DiffusionLightningModule(UNet(in_channels=1, image_size=8, model_channels=16), compile="indcutor")
