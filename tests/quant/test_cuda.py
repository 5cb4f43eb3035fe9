"""CUDA: quantizers, the optimizer wrapper and local training agree with the CPU and learn.

Skipped without a GPU; run them with ``bash benchmarks/cuda_check.sh`` on a CUDA machine. A first
run there (torch 2.11, H200) trained an 8-bit ConvNet to nothing (test accuracy 10.8% after 36
rounds) while fp32 learned: these cases isolate each piece of that path. The cause (found on an
H200 on 2026-12-04, results/gpu-2026-12-04): the compiled quantizer passed zero gradients back.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lptfl.data import load_dataset
from lptfl.fl import LocalTrainer, evaluate
from lptfl.models import ConvNet
from lptfl.quant import BFPFormat, PrecisionPolicy
from lptfl.quant.activation import quantize_activation
from lptfl.quant.optim import _quantize_all
from lptfl.quant.quantize import quantize_with_key
from lptfl.quant.random import draw_key, hashed_uniform_like

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FORMATS = [BFPFormat(8), BFPFormat(8, rounding="nearest"), BFPFormat(6), BFPFormat(8, layout="tensor"),
           BFPFormat(4, layout="B")]
SCALES = [1e-7, 1e-3, 1.0, 1e4]  # gradients, weights, activations


def test_hashed_uniform_on_cuda_matches_cpu_eager_and_compiled():
    x = torch.empty(64, 32, 3, 3)
    key = draw_key(torch.Generator().manual_seed(0))
    cpu = hashed_uniform_like(x, key)
    assert 0.45 < float(cpu.mean()) < 0.55
    assert torch.equal(hashed_uniform_like(x.cuda(), key.cuda()).cpu(), cpu)
    assert torch.equal(torch.compile(hashed_uniform_like)(x.cuda(), key.cuda()).cpu(), cpu)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name if hasattr(f, "name") else str(f))
def test_quantize_on_cuda_matches_cpu_eager_and_compiled(fmt):
    compiled = torch.compile(quantize_with_key, dynamic=False)  # as MaybeCompiled: one graph per format
    key = draw_key(torch.Generator().manual_seed(0))
    for scale in SCALES:
        x = torch.randn(64, 32, 3, 3) * scale
        cpu = quantize_with_key(x, fmt, key)
        assert torch.equal(quantize_with_key(x.cuda(), fmt, key.cuda()).cpu(), cpu), scale
        assert torch.equal(compiled(x.cuda(), fmt, key.cuda()).cpu(), cpu), scale


def test_optimizer_quantization_on_cuda_matches_cpu():
    """The optimizer's list form (one compiled graph for every parameter) with small updates."""
    model = ConvNet(1, 10, 28)
    tensors = [p.detach() + 1e-4 * torch.randn_like(p) for p in model.parameters()]
    keys = torch.randint(-(1 << 31), (1 << 31) - 1, (len(tensors),), dtype=torch.int32,
                         generator=torch.Generator().manual_seed(0))
    fmt = BFPFormat(8)
    cpu = _quantize_all(tensors, fmt, keys)
    gpu = torch.compile(_quantize_all)([t.cuda() for t in tensors], fmt, keys.cuda())
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        assert torch.equal(a, b.cpu()), i


@pytest.mark.parametrize("forward", [BFPFormat(8, layout="tensor"), None], ids=["quantized", "fp32"])
def test_compiled_quantizer_passes_errors_back_on_cuda(forward):
    """Under torch 2.11 on CUDA the compiled quantizer passed zero gradients back (its output had
    been changed in place), so 8-bit training learned nothing; eager and compiled must agree."""
    error = BFPFormat(8, layout="tensor")
    key = torch.tensor(123, dtype=torch.int32, device="cuda")
    x = torch.randn(32, 128, 14, 14, device="cuda", requires_grad=True)
    g = torch.randn_like(x) * 1e-5
    f = lambda t: quantize_activation(t * 2.0, key, forward, error) * 3.0
    f(x).backward(g)
    eager, x.grad = x.grad, None
    torch.compile(f, dynamic=False)(x).backward(g)
    assert float(eager.norm()) > 0
    assert torch.equal(x.grad, eager)


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead"], ids=["eager", "compiled", "cuda-graphs"])
@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_8bit_local_training_on_cuda_learns_like_the_cpu(mode, compute, caplog):
    """With CUDA graphs (reduce-overhead) the training loss was overwritten by the optimizer's replay
    before it was summed (H200, 2026-12-04); the trainer must run through and learn."""
    compile = mode is not None
    data = load_dataset("digits", None)
    x, y = data.train_x[:320], data.train_y[:320]
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = ConvNet(data.train_x.shape[1], data.num_classes, data.train_x.shape[-1], width=32)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        policy = PrecisionPolicy.low_precision(8, compute=compute if device == "cuda" else "fp32")
        trainer = LocalTrainer(model, policy, example_input=x[:32], compile=compile and device == "cuda",
                               compile_mode=mode or "default", device=device)
        with caplog.at_level(logging.WARNING):
            result = trainer.train(start, x, y, epochs=5, batch_size=32, generator=torch.Generator().manual_seed(0))
        if compile and device == "cuda":
            assert trainer._forward_backward.active and trainer.optimizer._quantize_all.active, caplog.text
        trainer.model.load_state_dict(result.state)
        losses[device] = evaluate(trainer.model, x, y, batch_size=64)[0]
    assert losses["cpu"] < 1.0  # from ln(10) = 2.3 at the start
    assert losses["cuda"] < 1.5 * losses["cpu"], losses
