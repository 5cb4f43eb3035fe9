"""The batched cohort (lptfl.fl.cohort) against the sequential trainer it must reproduce."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lptfl.fl.algorithms import proximal_regularizer
from lptfl.fl.client import LocalTrainer
from lptfl.fl.client_state import ClientStateStore
from lptfl.fl.cohort import CohortClient, CohortTrainer, cohort_unsupported
from lptfl.models import MLP, ConvNet, resnet8
from lptfl.quant import BFPFormat, PrecisionPolicy
from lptfl.quant.quantize import quantize_with_key
from lptfl.quant.random import hashed_uniform_cohort, hashed_uniform_like

POLICIES = {
    "fp32": PrecisionPolicy.full_precision(),
    "q8": PrecisionPolicy.low_precision(8, compute="fp32"),
    "q4": PrecisionPolicy.low_precision(4, compute="fp32"),
    "mixed": PrecisionPolicy.low_precision(8, weight_bits=6, activation_bits=8, grad_bits=4, compute="fp32"),
}


def relative_update_difference(a: dict, b: dict, start: dict) -> float:
    """|a - b| / |a - start| over all entries (relative L2 of two updates from ``start``)."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    den = sum(float(((a[k] - start[k]) ** 2).sum()) for k in a) ** 0.5
    return num / den


def setup(model, policy, sizes, seed=0, in_shape=(1, 8, 8)):
    torch.manual_seed(seed)
    trainer = LocalTrainer(model, policy, example_input=torch.randn(4, *in_shape))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    data = [(torch.randn(n, *in_shape), torch.randint(0, 10, (n,))) for n in sizes]
    return trainer, start, data


def sequential(trainer, start, data, *, rounds=2, epochs=1, batch_size=8, regularizer=None):
    """Each client alone for ``rounds`` rounds from ``start`` (its Adam state kept between them)."""
    store = ClientStateStore()
    out = []
    for k, (x, y) in enumerate(data):
        gen = torch.Generator().manual_seed(100 + k)
        results = []
        trainer.inner.state.clear()
        for _ in range(rounds):
            results.append(trainer.train(start, x, y, epochs=epochs, batch_size=batch_size, generator=gen,
                                         regularizer=regularizer))
        store.save(k, trainer.inner)
        out.append((results, store.arrays(k)))
    return out


def batched(trainer, start, data, *, rounds=2, epochs=1, batch_size=8, prox_mu=0.0, compile=False):
    cohort = CohortTrainer(trainer, compile=compile)
    gens = [torch.Generator().manual_seed(100 + k) for k in range(len(data))]
    states = [None] * len(data)
    rounds_out = []
    for _ in range(rounds):
        done = cohort.train([CohortClient(start, x, y, g, s) for (x, y), g, s in zip(data, gens, states)],
                            epochs=epochs, batch_size=batch_size, lr=1e-3, prox_mu=prox_mu)
        states = [d.optimizer_state for d in done]
        rounds_out.append(done)
    return rounds_out


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_fp32_updates_equal_the_sequential_ones(model_name):
    # unequal clients: short last batches of different sizes, and clients that stop early; two
    # epochs and a second round from stored Adam state. No bias right before a normalisation here:
    # such a bias has a zero gradient, whose float noise Adam turns into a full step (see the docs).
    model = MLP(1, 10, 8, hidden=16) if model_name == "mlp" else ConvNet(1, 10, 8, width=4, depth=1, norm="none")
    trainer, start, data = setup(model, POLICIES["fp32"], [13, 29, 8, 21])
    seq = sequential(trainer, start, data, epochs=2)
    cohort = batched(trainer, start, data, epochs=2)
    for k in range(len(data)):
        for r in range(2):
            ours, theirs = cohort[r][k].result, seq[k][0][r]
            assert relative_update_difference(ours.state, theirs.state, start) <= 1e-5
            assert ours.steps == theirs.steps and ours.num_samples == theirs.num_samples
            assert ours.loss == pytest.approx(theirs.loss, rel=1e-6)
        ours, theirs = cohort[1][k].optimizer_state, seq[k][1]
        assert sorted(ours) == sorted(theirs) == ["exp_avg", "exp_avg_sq", "step"]
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(ours["step"], theirs["step"])


def test_compiled_cohort_pads_to_one_shape_and_matches_the_sequential_updates():
    # compiled, short batches are padded and finished clients take zero-weight steps: one shape,
    # the same updates (fp32: within float reassociation; 8 bits: the same losses to rounding flips)
    for policy, tolerance in (("fp32", 1e-5), ("q8", None)):
        trainer, start, data = setup(MLP(1, 10, 8, hidden=16), POLICIES[policy], [13, 29, 8])
        seq = sequential(trainer, start, data, rounds=1)
        cohort = CohortTrainer(trainer, compile=True)
        done = batched_with(cohort, start, data)
        assert cohort._vloss.active  # the first compiled step agreed with eager
        for k in range(len(data)):
            ours, theirs = done[k].result, seq[k][0][0]
            assert ours.steps == theirs.steps
            assert ours.loss == pytest.approx(theirs.loss, rel=1e-3)
            if tolerance is not None:
                assert relative_update_difference(ours.state, theirs.state, start) <= tolerance


def batched_with(cohort, start, data, batch_size=8):
    gens = [torch.Generator().manual_seed(100 + k) for k in range(len(data))]
    return cohort.train([CohortClient(start, x, y, g) for (x, y), g in zip(data, gens)], epochs=1,
                        batch_size=batch_size, lr=1e-3)


@pytest.mark.parametrize("policy", ["q8", "q4", "mixed"])
def test_low_precision_cohort_uses_each_clients_own_rounding_keys(policy):
    # On an MLP with fp32 products every operation of the two paths is the same, so with the same
    # keys (quantizers, gradients, weights, in the same order per client) the updates are identical.
    trainer, start, data = setup(MLP(1, 10, 8, hidden=16), POLICIES[policy], [13, 29, 8])
    seq = sequential(trainer, start, data)
    cohort = batched(trainer, start, data)
    for k in range(len(data)):
        for r in range(2):
            ours, theirs = cohort[r][k].result.state, seq[k][0][r].state
            for name in theirs:
                assert torch.equal(ours[name], theirs[name]), (k, r, name)


def test_a_client_is_trained_the_same_alone_or_beside_others():
    # a small client beside a large one: it stops after its own steps, its Adam state does not move
    trainer, start, data = setup(MLP(1, 10, 8, hidden=16), POLICIES["q8"], [9, 40])
    together = batched(trainer, start, data, rounds=1)[0]
    alone = batched(trainer, start, data[:1], rounds=1)[0]
    assert together[0].result.steps == 2 and together[1].result.steps == 5
    for name in alone[0].result.state:
        assert torch.equal(together[0].result.state[name], alone[0].result.state[name])
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(together[0].optimizer_state[name], alone[0].optimizer_state[name])
    np.testing.assert_array_equal(together[0].optimizer_state["step"], np.full(6, 2.0))


def test_fedprox_term_matches_the_sequential_regularizer():
    trainer, start, data = setup(MLP(1, 10, 8, hidden=16), POLICIES["fp32"], [16, 24])
    regularizer = proximal_regularizer(trainer.model, start, 0.5)
    seq = sequential(trainer, start, data, rounds=1, regularizer=regularizer)
    cohort = batched(trainer, start, data, rounds=1, prox_mu=0.5)
    plain = batched(trainer, start, data, rounds=1)
    for k in range(2):
        assert relative_update_difference(cohort[0][k].result.state, seq[k][0][0].state, start) <= 1e-5
        assert relative_update_difference(plain[0][k].result.state, seq[k][0][0].state, start) > 1e-3


def test_cohort_state_goes_through_the_client_store_as_the_sequential_one():
    trainer, start, data = setup(MLP(1, 10, 8, hidden=16), POLICIES["q8"], [12])
    done = batched(trainer, start, data, rounds=1)[0][0]
    store = ClientStateStore()
    store.save_arrays(3, done.optimizer_state)
    store.load(3, trainer.inner)
    params = list(trainer.model.parameters())
    assert float(trainer.inner.state[params[0]]["step"]) == 2.0
    np.testing.assert_array_equal(trainer.inner.state[params[0]]["exp_avg"].reshape(-1).numpy(),
                                  done.optimizer_state["exp_avg"][: params[0].numel()])


def test_configurations_that_cannot_be_batched_say_why():
    assert "batch norm" in cohort_unsupported(LocalTrainer(resnet8(3, 10, 32), POLICIES["fp32"]))
    assert "Adam" in cohort_unsupported(LocalTrainer(MLP(1, 10, 8), POLICIES["fp32"], optimizer="sgd"))
    assert "FedGen" in cohort_unsupported(LocalTrainer(MLP(1, 10, 8), POLICIES["fp32"]), objective=object())
    assert cohort_unsupported(LocalTrainer(ConvNet(1, 10, 28), POLICIES["q8"])) is None
    with pytest.raises(ValueError, match="batch norm"):
        CohortTrainer(LocalTrainer(resnet8(3, 10, 32), POLICIES["fp32"]))


@settings(max_examples=30, deadline=None)
@given(clients=st.integers(1, 4), rows=st.integers(1, 6), cols=st.integers(1, 5),
       layout=st.sampled_from(["tensor", "B", "BC"]), rounding=st.sampled_from(["stochastic", "nearest"]),
       seed=st.integers(0, 2**31 - 1))
def test_cohort_quantization_is_each_clients_own(clients, rows, cols, layout, rounding, seed):
    # row k of a cohort's quantization equals client k's tensor quantized alone with its own key:
    # blocks never span clients and the rounding draws are the client's
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(clients, rows, cols, 3, generator=gen) * torch.rand(clients, 1, 1, 1, generator=gen) * 10
    keys = torch.randint(-(1 << 31), (1 << 31) - 1, (clients,), dtype=torch.int32, generator=gen)
    fmt = BFPFormat(5, layout=layout, small_block="None" if layout == "tensor" else "FC", rounding=rounding)
    key = keys if rounding == "stochastic" else None
    together = quantize_with_key(x, fmt, key, cohort=True)
    for k in range(clients):
        alone = quantize_with_key(x[k], fmt, None if key is None else keys[k])
        assert torch.equal(together[k], alone)
        assert torch.equal(hashed_uniform_cohort(x, keys)[k], hashed_uniform_like(x[k], keys[k]))
