"""The engine's GPU-path fixes that the CPU can prove (issue 11, section 0): ``precision`` in the
spec and honoured by `fit` (autocast dtype or none, fp16's loss scaler), checkpoints that hold
CPU tensors only, and the loader path's DataLoaders built once per run with the worker settings a
CUDA device gets. The CUDA-marked tests repeat what needs a GPU (scripts/gpu-check runs them).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jumpout import engine
from jumpout.engine import fit, load_checkpoint, loader_workers
from jumpout.layer import Jumpout
from jumpout.spec import FIELDS, ConfigError, resolve_config
from jumpout.spec_options import add_spec_options, spec_values


def config(tmp_path: Path | None = None, dataset="digits", arch="mlp", **overrides):
    values = dict(
        epochs=2, batch_size=32, train_size=192, test_size=96, device="cpu", seed=5, lr=0.05
    )
    if tmp_path is not None:
        values["out_dir"] = str(tmp_path)
    values.update(overrides)
    return resolve_config(dataset, arch, **values)


@pytest.fixture
def jumpout_input_dtypes(monkeypatch) -> list[torch.dtype]:
    """The dtype of every training input a Jumpout layer sees."""
    seen: list[torch.dtype] = []
    forward = Jumpout.forward

    def recording(self, input):
        if self.training:
            seen.append(input.dtype)
        return forward(self, input)

    monkeypatch.setattr(Jumpout, "forward", recording)
    return seen


def all_tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from all_tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from all_tensors(item)


# ---------------------------------------------------------------------------------------------
# precision in the spec


def test_precision_is_a_spec_field_defaulting_to_the_papers_fp32():
    assert FIELDS["precision"].choices == ("fp32", "bf16", "fp16")
    assert not FIELDS["precision"].operator  # an API client chooses it
    assert resolve_config("cifar10", "wrn_28_10").precision == "fp32"
    assert resolve_config("cifar10", "wrn_28_10", precision="bf16").precision == "bf16"
    with pytest.raises(ConfigError) as error:
        resolve_config("cifar10", "wrn_28_10", precision="fp64")
    assert error.value.field == "precision"
    assert "accepted: fp32, bf16, fp16" in str(error.value)


def test_precision_on_the_command_line():
    parser = argparse.ArgumentParser()
    add_spec_options(parser)
    args = parser.parse_args(["--dataset", "digits", "--arch", "mlp", "--precision", "bf16"])
    assert spec_values(args)["precision"] == "bf16"
    with pytest.raises(ConfigError):
        spec_values(parser.parse_args(["--dataset", "d", "--arch", "m", "--precision", "half"]))


# ---------------------------------------------------------------------------------------------
# precision honoured by fit


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Let fp16 run on the CPU (refused there in use: no fast kernels), to test the loss-scaler
    path here; ``device=auto`` passes the spec's check, the small MLP keeps it quick."""
    monkeypatch.setattr(engine, "_FP16_DEVICE_TYPES", ("cuda", "cpu"))
    return "auto"


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)
def test_fit_runs_the_model_in_the_precision_asked(
    tmp_path, jumpout_input_dtypes, fp16_on_cpu, precision, dtype
):
    device = fp16_on_cpu if precision == "fp16" else "cpu"
    result = fit(config(tmp_path, precision=precision, device=device, epochs=1))
    assert set(jumpout_input_dtypes) == {dtype}
    assert result.final_accuracy is not None
    # The weights stay fp32 (autocast casts per op), so checkpoints do too.
    state = load_checkpoint(result.last_checkpoint)
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    assert state["config"]["precision"] == precision
    assert ("scaler" in state) == (precision == "fp16")


def test_fp16_checkpoint_keeps_the_loss_scale_and_a_resume_restores_it(
    tmp_path, monkeypatch, fp16_on_cpu
):
    fit(config(tmp_path, precision="fp16", device=fp16_on_cpu, keep_last=5))
    epoch1 = str(tmp_path / engine.checkpoint_name(1))
    scale = load_checkpoint(epoch1)["scaler"]["scale"]
    assert scale > 0
    seen = []
    load = torch.amp.GradScaler.load_state_dict

    def recording(self, state):
        seen.append(state["scale"])
        return load(self, state)

    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", recording)
    resumed = fit(
        config(tmp_path, precision="fp16", device=fp16_on_cpu, keep_last=5), resume_from=epoch1
    )
    assert seen == [scale]
    assert resumed.epochs_completed == 2


def test_a_resume_in_another_precision_is_refused(tmp_path):
    first = fit(config(tmp_path, precision="bf16"))
    with pytest.raises(ConfigError) as error:
        fit(config(tmp_path, precision="fp32"), resume_from=first.last_checkpoint)
    assert error.value.field == "precision"


def test_fp16_is_refused_on_the_cpu_with_what_to_use_instead():
    with pytest.raises(ConfigError) as error:
        config(precision="fp16")  # device=cpu: refused with the spec
    assert error.value.field == "precision" and "bf16 or fp32" in str(error.value)
    if not torch.cuda.is_available():  # auto: the device is known only when it runs
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            fit(config(precision="fp16", device="auto"))


def test_bf16_on_the_cpu_learns(tmp_path):
    result = fit(config(tmp_path, precision="bf16", epochs=3, train_size=320, test_size=200))
    assert result.final_accuracy > 0.5


# ---------------------------------------------------------------------------------------------
# checkpoints hold CPU tensors


def test_on_cpu_walks_nested_state():
    Pair = collections.namedtuple("Pair", "a b")
    state = {"m": {"w": torch.ones(2)}, "l": [torch.zeros(1), 3], "t": Pair(torch.ones(1), "x")}
    moved = engine._on_cpu(state)
    assert all(t.device.type == "cpu" for t in all_tensors(moved))
    assert isinstance(moved["t"], Pair) and moved["t"].b == "x" and moved["l"][1] == 3
    assert moved["m"]["w"] is state["m"]["w"]  # a CPU tensor is not copied


def test_every_checkpoint_goes_through_on_cpu(tmp_path, monkeypatch):
    moved = []
    real = engine._on_cpu

    def spy(value):
        result = real(value)
        if isinstance(value, dict) and "optimizer" in value:
            moved.append(value)
        return result

    monkeypatch.setattr(engine, "_on_cpu", spy)
    result = fit(config(tmp_path, epochs=2, keep_last=5))
    assert len(moved) == 2  # one per epoch, model and optimizer state included
    state = torch.load(result.last_checkpoint, weights_only=True)  # no map_location
    assert all(t.device.type == "cpu" for t in all_tensors(state))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_checkpoint_loads_in_a_process_without_a_gpu(tmp_path):
    result = fit(config(tmp_path, device="cuda", precision="bf16", epochs=1))
    assert next(result.model.parameters()).is_cuda
    state = torch.load(result.last_checkpoint, weights_only=True)
    assert all(t.device.type == "cpu" for t in all_tensors(state))
    code = (
        "import sys, torch; s = torch.load(sys.argv[1], weights_only=True); "
        "print(len(s['optimizer']['state']))"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", code, result.last_checkpoint], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()


# ---------------------------------------------------------------------------------------------
# the loader path: built once, workers for CUDA


def test_loader_workers_default_is_none_on_cpu_and_up_to_8_on_cuda(monkeypatch):
    auto = config()
    assert auto.num_workers is None
    assert loader_workers(auto, torch.device("cpu")) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers(auto, torch.device("cuda")) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(auto, torch.device("cuda")) == 2
    assert loader_workers(config(num_workers=0), torch.device("cuda")) == 0
    assert loader_workers(config(num_workers=3), torch.device("cpu")) == 3


def test_a_cuda_run_gets_persistent_pinned_workers(monkeypatch):
    """The DataLoader a CUDA loader-path run builds (constructing one starts no process)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    data = engine._load_data(config(), torch.device("cpu"))
    cuda = torch.device("cuda")
    batch = config().batch_size
    train = engine._train_loader(data, config(), cuda, torch.Generator(), True, batch)
    test = engine._eval_loader(data.test_set, config(), cuda, 64)
    for loader in (train, test):
        assert loader.num_workers == 8
        assert loader.persistent_workers and loader.pin_memory
    cpu = engine._train_loader(data, config(), torch.device("cpu"), torch.Generator(), True, batch)
    assert cpu.num_workers == 0 and not cpu.persistent_workers and not cpu.pin_memory


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loaders_are_built_once_per_run(tmp_path, monkeypatch, workers):
    built = []
    real = torch.utils.data.DataLoader

    class Counting(real):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("persistent_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Counting)
    result = fit(config(tmp_path, epochs=3, num_workers=workers, val_fraction=0.2))
    assert result.epochs_completed == 3
    # train, test and validation: one each for three epochs, persistent when there are workers.
    assert built == [workers > 0] * 3


def test_one_loader_serves_every_epoch_with_that_epochs_augmentation(tmp_path):
    """The epoch travels with each index (`_EpochSampler`), so a persistent worker started in
    epoch 1 still augments epoch 2's samples with epoch 2's seed."""
    base = torch.utils.data.TensorDataset(torch.arange(6.0))

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, index):
            return base[index][0] + torch.rand(()), 0

    seeded = engine._SeededAugmentation(Noisy(), seed=1)
    assert torch.equal(seeded[(2, 4)][0], seeded[(2, 4)][0])
    assert not torch.equal(seeded[(1, 4)][0], seeded[(2, 4)][0])
    sampler = engine._EpochSampler()
    sampler.set_epoch(3, [5, 0])
    assert list(sampler) == [(3, 5), (3, 0)] and len(sampler) == 2
