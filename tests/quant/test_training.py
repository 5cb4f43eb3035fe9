import pytest
import torch
from torch import nn

from lptfl.models import MLP, ConvNet, resnet8
from lptfl.quant import (
    BFPFormat,
    LowPrecisionOptimizer,
    PrecisionPolicy,
    Quantizer,
    insert_quantizers,
    quantize,
    quantizers_of,
    reseed_quantizers,
)
from lptfl.quant.compute import (
    BF16Conv2d,
    BF16Linear,
    enable_bf16_compute,
    fast_bf16_available,
)
from lptfl.quant.quantize import block_amax, block_exponent


def on_grid(t: torch.Tensor, fmt: BFPFormat) -> bool:
    e = block_exponent(block_amax(t.float(), fmt), fmt).to(torch.float64)
    scale = torch.exp2(e - (fmt.bits - 2))
    # The negative-saturation edge may sit one exponent lower: check against half the scale too.
    q = t.double() / scale
    q2 = t.double() / (scale / 2)
    return bool(((q == q.round()) | (q2 == q2.round())).all())


def test_quantizer_rounds_forward_values_and_backward_errors():
    fwd = BFPFormat(4, layout="tensor")
    bwd = BFPFormat(3, layout="tensor", rounding="nearest")
    q = Quantizer(fwd, bwd)
    q.key.fill_(5)
    x = torch.randn(16, 8, requires_grad=True)
    y = q(x)
    assert on_grid(y.detach(), fwd)
    g = torch.randn(16, 8)
    y.backward(g)
    assert torch.equal(x.grad, quantize(g, bwd))


def test_quantizer_pass_through_and_state_dict_untouched():
    model = ConvNet(1, 10, 28)
    keys = list(model.state_dict())
    inserted = insert_quantizers(model, BFPFormat(8, layout="tensor"), BFPFormat(8, layout="tensor"))
    # 3 conv + 3 relu + 3 pool + the classifier
    assert len(inserted) == 10 and quantizers_of(model) == inserted
    assert list(model.state_dict()) == keys
    again = insert_quantizers(model, None, None)
    assert len(quantizers_of(model)) == 10 and len(again) == 10
    x = torch.randn(2, 1, 28, 28)
    plain = ConvNet(1, 10, 28)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(x), plain(x))
    # a single position given as a string is that position, not its letters
    assert len(insert_quantizers(ConvNet(1, 10, 28), None, None, positions="linear")) == 4
    with pytest.raises(ValueError, match=r"unknown quantizer positions \['conv'\]"):
        insert_quantizers(ConvNet(1, 10, 28), None, None, positions=["conv"])


def test_every_activation_is_on_the_grid_after_insertion():
    fmt = BFPFormat(8, layout="tensor")
    model = ConvNet(1, 10, 28)
    insert_quantizers(model, fmt, fmt)
    reseed_quantizers(model, torch.Generator().manual_seed(0))
    seen = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ReLU, nn.AvgPool2d, nn.Linear)):
            m.register_forward_hook(lambda mod, i, o: seen.append(o.detach()))
    model(torch.randn(4, 1, 28, 28))
    assert len(seen) == 10 and all(on_grid(t, fmt) for t in seen)


def test_reseed_is_reproducible_and_changes_keys():
    model = MLP(1, 10, 8)
    insert_quantizers(model, BFPFormat(8, layout="tensor"), None)
    reseed_quantizers(model, torch.Generator().manual_seed(1))
    a = [q.key.clone() for q in quantizers_of(model)]
    reseed_quantizers(model, torch.Generator().manual_seed(1))
    b = [q.key.clone() for q in quantizers_of(model)]
    reseed_quantizers(model, torch.Generator().manual_seed(2))
    c = [q.key.clone() for q in quantizers_of(model)]
    assert a == b and a != c and len(set(int(k) for k in a)) == len(a)


def test_low_precision_optimizer_keeps_weights_on_grid_and_quantizes_grads():
    torch.manual_seed(0)
    model = ConvNet(1, 10, 28, width=8)
    wfmt, gfmt = BFPFormat(8), BFPFormat(6, rounding="nearest")
    inner = torch.optim.Adam(model.parameters(), 1e-3)
    opt = LowPrecisionOptimizer(inner, weight=wfmt, grad=gfmt, generator=torch.Generator().manual_seed(0))
    seen_grads = {}
    orig_step = inner.step

    def spy_step(*args, **kwargs):
        for p in model.parameters():
            seen_grads[p] = p.grad.clone()
        return orig_step(*args, **kwargs)

    inner.step = spy_step
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    raw = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    for p in model.parameters():
        assert on_grid(p.detach(), wfmt)
        assert torch.equal(seen_grads[p], quantize(raw[p], gfmt))
    assert all(v.dtype == torch.float32 for s in inner.state.values() for v in s.values() if torch.is_tensor(v))


def test_low_precision_optimizer_checks_its_arguments_when_built():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer .*got generator"):
        LowPrecisionOptimizer(model.parameters(), weight=BFPFormat(8))
    inner = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="weight must be a BFPFormat or None, got int"):
        LowPrecisionOptimizer(inner, weight=8)
    with pytest.raises(TypeError, match="grad must be a BFPFormat or None, got str"):
        LowPrecisionOptimizer(inner, grad="bfp8")
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator \(e.g. .*\) or None, got int"):
        LowPrecisionOptimizer(inner, generator=0)


def test_full_precision_policy_adds_nothing():
    policy = PrecisionPolicy.preset("fp32")
    model = MLP(1, 10, 8)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    assert policy.is_full_precision
    assert policy.wrap_optimizer(opt) is opt
    policy.prepare_model(model)
    assert quantizers_of(model) == []


def test_presets_and_mixed_precision():
    p8 = PrecisionPolicy.preset("paper-8bit")
    assert p8.weight == BFPFormat(8, layout="BC") and p8.activation.layout == "tensor"
    assert p8.downlink.rounding == "nearest" and p8.uplink == p8.weight
    assert PrecisionPolicy.low_precision(8, downlink="stochastic").downlink == p8.weight  # stochastic, as the weights
    unquantized = PrecisionPolicy.low_precision(8, downlink="fp32", compute="bf16")
    assert unquantized.downlink is None and not unquantized.uses_bf16(torch.device("cpu"))  # rounds start off-grid
    assert PrecisionPolicy.low_precision(8, compute="bf16").uses_bf16(torch.device("cpu"))
    with pytest.raises(ValueError, match="downlink"):
        PrecisionPolicy.low_precision(8, downlink="bf16")
    assert PrecisionPolicy.preset("paper-6bit").grad.bits == 6
    mixed = PrecisionPolicy.low_precision(8, weight_bits=6, activation_bits=5, grad_bits=4)
    assert (mixed.weight.bits, mixed.activation.bits, mixed.error.bits, mixed.grad.bits) == (6, 5, 5, 4)
    with pytest.raises(ValueError, match="preset"):
        PrecisionPolicy.preset("paper-7bit")
    with pytest.raises(ValueError, match="compute"):
        PrecisionPolicy(compute="fp8")


def _grid_model(seed):
    torch.manual_seed(seed)
    model = ConvNet(1, 10, 28, width=16)
    fmt = BFPFormat(8, layout="tensor", rounding="nearest")
    insert_quantizers(model, fmt, fmt)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(quantize(p, BFPFormat(8, rounding="nearest")))
    return model


def test_bf16_compute_switches_only_layers_fed_by_quantizers_and_stays_close():
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([1, 2, 3, 4])
    ref, fast = _grid_model(0), _grid_model(0)
    switched = enable_bf16_compute(fast, x)
    assert switched == ["features.4", "features.8", "classifier"]  # not the first conv (raw input)
    assert type(fast.features[0]) is nn.Conv2d and isinstance(fast.features[4], BF16Conv2d)
    assert isinstance(fast.classifier, BF16Linear)
    assert list(fast.state_dict()) == list(ref.state_dict())
    loss_ref = nn.functional.cross_entropy(ref(x), y)
    loss_fast = nn.functional.cross_entropy(fast(x), y)
    assert abs(loss_ref.item() - loss_fast.item()) < 0.05


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bf16_products_differ_from_fp32_by_at_most_output_rounding(kind):
    g = torch.Generator().manual_seed(0)
    fmt = BFPFormat(8, layout="tensor", rounding="nearest")
    if kind == "conv":
        ref = nn.Conv2d(16, 8, 3, padding=1)
        x = quantize(torch.randn(4, 16, 10, 10, generator=g), fmt)
    else:
        ref = nn.Linear(64, 12)
        x = quantize(torch.randn(5, 64, generator=g), fmt)
    with torch.no_grad():
        ref.weight.copy_(quantize(ref.weight, BFPFormat(8, rounding="nearest")))
    fast = type(ref)(*([16, 8, 3] if kind == "conv" else [64, 12]), **({"padding": 1} if kind == "conv" else {}))
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = BF16Conv2d if kind == "conv" else BF16Linear
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    # With native bf16 products (AVX512-BF16/AMX, CUDA) accumulation is fp32: the output differs by its bf16
    # rounding (half an ulp, 2**-8 relative) plus accumulation order. CPUs without them fall back to kernels
    # that round partial sums to bf16: there the bound is relative to the largest output.
    native = fast_bf16_available("cpu")
    slack = 2.0**-10 if native else 2.0**-5

    def close(a, b):
        return bool(((a - b).abs() <= a.abs() * 2.0**-8 + a.abs().max() * slack).all())

    assert close(yr.detach(), yf.detach())
    err = quantize(torch.randn(yr.shape, generator=g), fmt)
    yr.backward(err)
    yf.backward(err)
    assert close(xr.grad, xf.grad) and close(ref.weight.grad, fast.weight.grad)
    assert torch.allclose(ref.bias.grad, fast.bias.grad)


def test_models_train_under_the_paper_policy():
    for factory in (lambda: ConvNet(1, 10, 28, width=8), lambda: MLP(1, 10, 28), lambda: resnet8(1, 10, 28)):
        torch.manual_seed(0)
        model = factory()
        policy = PrecisionPolicy.preset("paper-8bit")
        policy.prepare_model(model)
        g = torch.Generator().manual_seed(0)
        opt = policy.wrap_optimizer(torch.optim.Adam(model.parameters(), 1e-2), g)
        opt.quantize_weights()
        x = torch.randn(16, 1, 28, 28)
        y = torch.arange(16) % 10
        losses = []
        for _ in range(15):
            reseed_quantizers(model, g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] * 0.7, losses


def test_compiled_quantize_matches_eager():
    from lptfl.quant.quantize import quantize_with_key
    from lptfl.quant.random import draw_key

    compiled = torch.compile(quantize_with_key)
    fmt = BFPFormat(8, layout="B")
    x = torch.randn(32, 16, 3, 3)
    key = draw_key(torch.Generator().manual_seed(0))
    assert torch.equal(compiled(x, fmt, key), quantize_with_key(x, fmt, key))
