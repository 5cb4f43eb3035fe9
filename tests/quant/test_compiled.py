"""Compiled functions are checked against eager and dropped when they disagree (lptfl.quant.compiled)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lptfl.fl import LocalTrainer
from lptfl.quant import PrecisionPolicy
from lptfl.quant.compiled import MaybeCompiled, mismatch


def scaling_backend(factor: float):
    """A torch.compile backend that is wrong without failing: it scales every float output."""

    def backend(gm, example_inputs):
        def run(*args):
            out = gm(*args)
            return type(out)(o * factor if torch.is_tensor(o) and o.is_floating_point() else o for o in out)

        return run

    return backend


def test_mismatch_exact_nan_tolerance_and_structure():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert mismatch([a, torch.tensor([1, 2])], [a.clone(), torch.tensor([1, 2])]) is None  # NaN matches NaN
    assert "1 of 3 values differ" in mismatch(a + torch.tensor([0.0, 0.0, 1e-6]), a)
    assert "NaN" in mismatch(torch.tensor([1.0, 2.0, 3.0]), a)
    assert mismatch(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.001]), 1e-2) is None
    assert "relative 0.316 > 0.01" in mismatch(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]), 1e-2)
    small = torch.tensor(0.05)
    assert "relative 0.2 > 0.1" in mismatch(small * 1.2, small, 0.1)  # 0.01 off a norm of 0.05
    assert mismatch(small * 1.2, small, 0.1, floor=1.0) is None  # 0.01 off counts against 1.0
    assert "relative 0.2 > 0.1" in mismatch(small + 0.2, small, 0.1, floor=1.0)
    assert "2 tensors instead of 1" in mismatch([a, a], [a])
    assert "float32[2]" in mismatch(torch.zeros(2), torch.zeros(3))
    assert "values differ" in mismatch(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_a_wrong_compiled_result_is_replaced_by_eager_for_good(caplog):
    calls = []

    def double(x):
        calls.append(1)
        return x * 2

    fn = MaybeCompiled(double, verify=0.0, backend=scaling_backend(3.0))
    x = torch.arange(4.0)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(fn(x), x * 2)
    assert not fn.active and "wrong result for" in caplog.text and "double" in caplog.text
    assert torch.equal(fn(x + 1), (x + 1) * 2)


def test_a_right_compiled_result_is_kept():
    fn = MaybeCompiled(lambda x: x * 2, verify=0.0, backend="eager")
    x = torch.arange(4.0)
    assert torch.equal(fn(x), x * 2) and fn.active and fn.verify is None  # checked once only
    assert torch.equal(fn(x), x * 2)


def test_trainer_drops_a_miscompiled_step_and_optimizer_and_matches_eager(monkeypatch, caplog):
    """A compiler that scales outputs would train on wrong gradients and weights: the first compiled
    step and the first compiled quantization are repeated eagerly, found wrong, and replaced."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, backend=scaling_backend(3.0)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    results = {}
    for compiled in (True, False):
        trainer = LocalTrainer(model, PrecisionPolicy.preset("paper-8bit"), example_input=x[:16], compile=compiled)
        with caplog.at_level(logging.WARNING):
            results[compiled] = trainer.train(start, x, y, epochs=2, batch_size=16,
                                               generator=torch.Generator().manual_seed(1))
        if compiled:
            assert not trainer._forward_backward.active and not trainer.optimizer._quantize_all.active
    assert "wrong training step" in caplog.text and "wrong result for _quantize_all" in caplog.text
    assert results[True].loss == pytest.approx(results[False].loss, rel=1e-6)
    for name, value in results[False].state.items():
        assert torch.equal(results[True].state[name], value), name


@pytest.mark.slow
def test_inductor_compiled_training_passes_its_checks(caplog):
    """The real compiler (inductor) on the 8-bit ConvNet: both checks pass, so the fast path stays on."""
    from lptfl.data import load_dataset
    from lptfl.models import ConvNet

    data = load_dataset("digits", None)
    torch.manual_seed(0)
    model = ConvNet(data.train_x.shape[1], data.num_classes, data.train_x.shape[-1], width=8)
    trainer = LocalTrainer(model, PrecisionPolicy.preset("paper-8bit"), example_input=data.train_x[:32], compile=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        trainer.train(start, data.train_x[:96], data.train_y[:96], epochs=1, batch_size=32,
                      generator=torch.Generator().manual_seed(0))
    assert trainer._forward_backward.active and trainer.optimizer._quantize_all.active, caplog.text


def test_a_passing_check_keeps_the_compiled_step(monkeypatch):
    """A compiler slightly off (within the tolerances) passes, and training is exactly what the
    compiled step gives without the check: the check changes no result."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, backend=scaling_backend(1 + 1e-4)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    results = []
    for checked in (True, False):
        trainer = LocalTrainer(model, PrecisionPolicy.full_precision(), optimizer="sgd", compile=True)
        trainer._step_checked = not checked
        results.append(trainer.train(start, x, y, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(1)))
        assert trainer._forward_backward.active
    assert results[0].loss == results[1].loss
    for name, value in results[1].state.items():
        assert torch.equal(results[0].state[name], value), name


def test_inductor_8bit_evaluation_passes_the_engine_check_and_a_wrong_one_does_not():
    from lptfl.models import ConvNet
    from lptfl.experiment.evaluation import EVAL_TOLERANCE

    torch.manual_seed(0)
    model = ConvNet(1, 10, 28)
    PrecisionPolicy.low_precision(8).prepare_model(model, torch.randn(32, 1, 28, 28))
    model.eval()
    x = torch.randn(256, 1, 28, 28)
    with torch.no_grad():
        eager = model(x)
        # rounding flips cascade: a 1e-6 perturbation alone moves the logits by about 1%
        assert mismatch(model(x * (1 + 1e-6)), eager, EVAL_TOLERANCE / 5) is None
        checked = MaybeCompiled(model, verify=EVAL_TOLERANCE)
        checked(x)
        assert checked.active
        wrong = MaybeCompiled(model, verify=EVAL_TOLERANCE, backend=scaling_backend(1.5))
        assert torch.equal(wrong(x), eager)
        assert not wrong.active


def reusing_backend(gm, example_inputs, mode=None):
    """A torch.compile backend that returns its results in one buffer per output, reused by every
    call, as a replayed CUDA graph does."""
    buffers: list[torch.Tensor] = []

    def run(*args):
        out = gm(*args)
        if not buffers:
            buffers.extend(torch.empty_like(o) for o in out)
        for buffer, o in zip(buffers, out):
            buffer.copy_(o)
        return tuple(buffers)

    return run


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_results_of_cuda_graph_modes_survive_the_next_call(mode):
    """Under CUDA graphs a result read after the next compiled call (the training loss summed after
    the optimizer's step) was overwritten; in those modes MaybeCompiled copies its results out."""
    double = MaybeCompiled(lambda x: [x * 2, x + 1], mode=mode, backend=reusing_backend)
    first = double(torch.tensor([1.0, 2.0]))
    double(torch.tensor([5.0, 7.0]))
    kept = torch.equal(first[0], torch.tensor([2.0, 4.0])) and torch.equal(first[1], torch.tensor([2.0, 3.0]))
    assert kept == (mode != "default")  # the default mode copies nothing: the reused buffer shows through


def test_a_caller_that_uses_results_at_once_can_skip_the_copy():
    """The optimizer copies its results into the weights at once and passes copy_results=False."""
    double = MaybeCompiled(lambda x: [x * 2], mode="reduce-overhead", copy_results=False, backend=reusing_backend)
    first = double(torch.tensor([1.0, 2.0]))
    double(torch.tensor([5.0, 7.0]))
    assert torch.equal(first[0], torch.tensor([10.0, 14.0]))  # the reused buffer, uncopied
