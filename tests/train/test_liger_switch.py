"""train.liger_kernel reaches the trainer's arguments, and a GPU machine without the package is told
what to install before anything loads (a CPU machine is covered in tests/test_bad_input.py)."""

import sys

import pytest

from fabrika.errors import FabrikaError


def test_liger_switch_reaches_the_trainer_and_needs_its_package(tmp_path, monkeypatch):
    import torch

    from fabrika.train import setup

    params = setup.TrainParams(liger_kernel=True)
    assert setup.trainer_arguments(params, tmp_path, "fp32", 0).use_liger_kernel
    assert not setup.trainer_arguments(setup.TrainParams(), tmp_path, "fp32", 0).use_liger_kernel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    with pytest.raises(FabrikaError, match="train.liger_kernel: needs the liger-kernel package"):
        setup.check_device(params)
