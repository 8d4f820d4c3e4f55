"""Ctrl-C or SIGTERM stops a pytest run within seconds, also while a test trains in process.

The pytest run under test is a subprocess: two tests that each start a 100,000-step fit through
the CLI, in process. The signal arrives during the first fit, once it wrote a checkpoint; the run
must end within seconds with pytest's "interrupted" status, and the second test must never start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

INNER = """
import pytest
from test_cli import tiny_args
from lightning_diffusion.cli import DiffusionCLI


@pytest.mark.parametrize("run", ["first", "second"])
def test_long_fit(tmp_path, run):
    DiffusionCLI(args=["fit", *tiny_args(tmp_path, steps=100_000), "--model.init_args.fd_samples=0",
                       "--trainer.val_check_interval=50000", "--trainer.enable_model_summary=false",
                       "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                       "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1"])
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_during_an_in_process_fit_ends_the_pytest_session(tmp_path, signum):
    (tmp_path / "test_inner.py").write_text(INNER)
    basetemp = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    # The suite's conftest (its fixtures, as a plugin) is what is tested; the inner file sits outside tests/.
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", f"--basetemp={basetemp}",
           str(tmp_path / "test_inner.py")]
    process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(basetemp.glob("*/lightning_logs/version_0/checkpoints/*step=2.ckpt")):  # the fit is training
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the inner fit wrote no checkpoint of step 2 within 240 s"
            time.sleep(0.2)
        sent = time.monotonic()
        process.send_signal(signum)
        try:
            output = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            pytest.fail(f"pytest still ran 30 s after {signal.Signals(signum).name}")
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    assert took < 15, (took, output[-3000:])
    assert f"{signal.Signals(signum).name} during" in output and "test_long_fit[first]" in output, output[-3000:]
    assert (basetemp / "test_long_fit_first_0").is_dir() and not list(basetemp.glob("test_long_fit_second*"))
