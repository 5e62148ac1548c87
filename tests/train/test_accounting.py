"""MFU's two inputs: FLOPs per token (adapters train no base weights) and the GPU's peak by its name."""

import pytest
from transformers import LlamaConfig

from fabrika.models import plan
from fabrika.train import setup


def test_adapter_training_counts_four_n_flops_per_token():
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256)
    full, adapters = plan.flops_per_token(config, 2048), plan.flops_per_token(config, 2048, frozen_weights=True)
    attention = 12.0 * 32 * 32 * 128 * 2048
    assert (full - attention) / (adapters - attention) == pytest.approx(1.5)
    assert full / adapters == pytest.approx(1.45, abs=0.05)  # the ~1.5× a 6N count overstates QLoRA's MFU by


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA B200", 2250.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GH200 480GB", 989.0),
                                          ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0)])
def test_peak_by_device_name(monkeypatch, name, tflops):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    assert setup.peak_flops(setup.TrainParams()) == tflops * 1e12


def test_unknown_device_has_no_peak_and_gpu_hours_use_the_same_table():
    assert plan.device_peak_tflops("Some Future Accelerator") is None
    assert plan.gpu_hours(989e12 * 0.4 * 3600) == pytest.approx(1.0)
    assert plan.gpu_hours(312e12 * 0.5 * 3600, gpu="a100-80gb", mfu=0.5) == pytest.approx(1.0)
