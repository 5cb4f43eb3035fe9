"""Client failures and bad updates: --dropout, --min_clients, --max_update_norm, --robust."""

import math

import numpy as np
import pytest
import torch

from lptfl import codec
from lptfl.experiment.config import RunConfig
from lptfl.experiment.setup import client_fails, sample_clients
from lptfl.fl.robust import CoordinateWise, update_distance
from lptfl.fl.server import Server, ServerConfig
from lptfl.sim.engine import Simulation


@pytest.fixture(autouse=True)
def one_thread():  # 2 shared cores: torch's thread pool only oversubscribes them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_server(**options):
    initial = {"w": torch.zeros(4), "b": torch.zeros(2), "n": torch.tensor(0, dtype=torch.int64)}
    return Server(initial, ServerConfig(**options), full_precision=[])


def payload(w, b=(0.0, 0.0), n=1):
    state = {"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float32),
             "n": torch.tensor(n, dtype=torch.int64)}
    return codec.encode(state, None)


# --- dropout ---------------------------------------------------------------------------------


def test_client_fails_is_reproducible_and_has_the_asked_rate():
    draws = [client_fails(7, r, c, 0.2) for r in range(1, 201) for c in range(25)]
    assert draws == [client_fails(7, r, c, 0.2) for r in range(1, 201) for c in range(25)]
    assert sum(draws) / len(draws) == pytest.approx(0.2, abs=0.02)
    assert not any(client_fails(7, r, c, 0.0) for r in range(1, 20) for c in range(10))
    assert [client_fails(1, 3, c, 0.5) for c in range(50)] != [client_fails(2, 3, c, 0.5) for c in range(50)]


def _seed_with_skip_and_no_skip(num_clients, frac, dropout, min_clients):
    """A seed whose round 1 has enough replies and round 2 too few."""
    for seed in range(500):
        replies = []
        for r in (1, 2):
            clients = sample_clients(num_clients, frac, seed, r)
            replies.append(sum(not client_fails(seed, r, c, dropout) for c in clients))
        if replies[0] >= min_clients > replies[1] and replies[1] < len(sample_clients(num_clients, frac, seed, 2)):
            return seed
    raise AssertionError("no suitable seed")


def test_dropout_and_min_clients_skip_a_round_and_leave_the_model_unchanged():
    seed = _seed_with_skip_and_no_skip(4, 1.0, 0.4, 3)
    config = RunConfig(compile="off", model_width=4, num_clients=4, frac=1.0, c_rounds=2, seed=seed,
                       dropout=0.4, min_clients=3, moving_average=True)
    sim = Simulation(config)
    first = sim.run_round()
    expected_failed = [c for c in first.clients if client_fails(seed, 1, c, 0.4)]
    assert first.failed_clients == expected_failed and first.failed == len(expected_failed)
    assert not first.skipped and first.accepted == len(first.clients) - first.failed
    assert len(first.bytes_up_per_client) == first.accepted  # failed clients send nothing
    assert first.bytes_down == first.bytes_down_per_client * len(first.clients)  # but were sent the model
    before = {k: v.clone() for k, v in sim.server.global_state.items()}
    average_before = {k: v.clone() for k, v in sim.server.average_state.items()}
    second = sim.run_round()
    assert second.skipped and second.round == 2 and sim.round == 2
    assert second.failed == sum(client_fails(seed, 2, c, 0.4) for c in second.clients)
    for name, value in before.items():
        assert torch.equal(sim.server.global_state[name], value)
        assert torch.equal(sim.server.average_state[name], average_before[name])


def test_config_validates_failure_flags():
    for bad in (dict(dropout=1.0), dict(dropout=-0.1), dict(min_clients=0), dict(max_update_norm=-1.0),
                dict(robust="mean"), dict(trim_fraction=0.5)):
        with pytest.raises(ValueError):
            RunConfig(**bad).validate()


def test_new_flags_at_default_keep_the_fingerprint_and_change_it_when_set():
    base = RunConfig()
    assert RunConfig(checkpoint_every=5).fingerprint() == base.fingerprint()
    assert RunConfig(eval_every=5).fingerprint() == base.fingerprint()
    for changed in (dict(dropout=0.2), dict(min_clients=2), dict(max_update_norm=3.0), dict(robust="median"),
                    dict(eval_precision="full")):
        assert RunConfig(**changed).fingerprint() != base.fingerprint()


# --- max_update_norm ---------------------------------------------------------------------------


def test_max_update_norm_rejects_far_updates_and_counts_them():
    server = make_server(max_update_norm=2.0)
    server.begin_round()
    assert server.receive(payload([1.0, 1.0, 0.0, 0.0]), 10, client=0)  # distance sqrt(2)
    assert not server.receive(payload([3.0, 0.0, 0.0, 0.0]), 10, client=1)  # distance 3
    assert server.receive(payload([0.0, 0.0, 1.0, 1.0], b=(0.0, 1.0)), 10, client=2)  # distance sqrt(3)
    assert server.end_round()
    assert server.stats.accepted == 2 and server.stats.rejected == 1 and server.stats.rejected_norm == 1
    assert "client 1" in server.stats.reasons[0] and "max_update_norm" in server.stats.reasons[0]
    assert torch.allclose(server.global_state["w"], torch.tensor([0.5, 0.5, 0.5, 0.5]))


def test_update_norm_is_measured_from_the_served_model():
    server = make_server(max_update_norm=1.5, moving_average=True, moving_weight=0.5)
    server.begin_round()
    server.receive(payload([2.0, 0.0, 0.0, 0.0]), 1)  # distance 2 from the zero model: rejected
    server.receive(payload([1.0, 0.0, 0.0, 0.0]), 1)
    server.end_round()
    assert server.stats.rejected_norm == 1
    server.begin_round()  # served model is now the average [1, 0, 0, 0]
    assert server.receive(payload([2.0, 0.0, 0.0, 0.0]), 1)
    assert update_distance({"w": torch.ones(4)}, {"w": torch.zeros(4)}) == pytest.approx(2.0)


def test_all_updates_rejected_skips_the_round():
    server = make_server(max_update_norm=0.5)
    server.begin_round()
    server.receive(payload([5.0, 0.0, 0.0, 0.0]), 1)
    server.receive(b"not a payload", 1)  # the codec refuses it
    assert not server.end_round()
    assert server.stats.skipped and server.stats.rejected == 2 and server.round == 1
    assert torch.equal(server.global_state["w"], torch.zeros(4))


# --- robust aggregation ------------------------------------------------------------------------


UPDATES = [[1.0, 2.0, 0.0, -1.0], [2.0, 1.0, 0.0, -2.0], [3.0, 3.0, 0.0, -3.0], [4.0, 5.0, 0.0, -4.0],
           [1000.0, -1000.0, 0.0, 1000.0]]


def aggregate(mode, trim_fraction=0.2, updates=UPDATES, **options):
    server = make_server(robust=mode, trim_fraction=trim_fraction, **options)
    server.begin_round()
    for i, w in enumerate(updates):
        assert server.receive(payload(w, n=i + 7), num_samples=100 * (i + 1), client=i)
    assert server.end_round()
    return server


def test_median_is_coordinatewise_and_ignores_an_outlier():
    server = aggregate("median")
    assert torch.equal(server.global_state["w"], torch.tensor([3.0, 2.0, 0.0, -2.0]))
    assert server.global_state["n"].item() == 7  # integer buffers from the first client
    even = aggregate("median", updates=UPDATES[:4])
    assert torch.equal(even.global_state["w"], torch.tensor([2.5, 2.5, 0.0, -2.5]))


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    server = aggregate("trimmed_mean", trim_fraction=0.2)  # floor(0.2 * 5) = 1 dropped at each end
    expected = torch.tensor([(2 + 3 + 4) / 3, (1 + 2 + 3) / 3, 0.0, (-3 - 2 - 1) / 3])
    assert torch.allclose(server.global_state["w"], expected, atol=1e-6)
    untrimmed = aggregate("trimmed_mean", trim_fraction=0.1)  # floor(0.5) = 0: the plain unweighted mean
    assert torch.allclose(untrimmed.global_state["w"], torch.tensor(UPDATES).mean(0), atol=1e-4)


def test_robust_aggregation_composes_with_the_moving_average():
    server = make_server(robust="median", moving_average=True, moving_weight=0.5)
    for _ in range(2):
        server.begin_round()
        for w in UPDATES:
            server.receive(payload(w), 1)
        server.end_round()
    median = torch.tensor([3.0, 2.0, 0.0, -2.0])
    assert torch.equal(server.global_state["w"], median)
    assert torch.allclose(server.average_state["w"], median)  # average of two equal medians
    assert torch.equal(server.served_state()["w"], server.average_state["w"])


def test_coordinatewise_validates_its_options():
    with pytest.raises(ValueError):
        CoordinateWise("mean")
    with pytest.raises(ValueError):
        CoordinateWise("trimmed_mean", 0.5)
    with pytest.raises(RuntimeError):
        CoordinateWise("median").result({"w": torch.zeros(1)})
    assert math.isclose(update_distance({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}), 5.0)


def test_robust_run_end_to_end():
    config = RunConfig(compile="off", model_width=4, num_clients=4, frac=1.0, c_rounds=1, robust="trimmed_mean",
                       trim_fraction=0.25, max_update_norm=1e6)
    sim = Simulation(config)
    metrics = sim.run_round()
    assert metrics.accepted == 4 and metrics.rejected == 0 and not metrics.skipped
    assert all(torch.isfinite(v).all() for v in sim.server.global_state.values() if v.is_floating_point())


def test_a_client_whose_training_diverges_is_rejected_and_keeps_its_state(monkeypatch):
    """A client whose update holds NaN cannot send it (the wire carries finite values): the server
    counts it as rejected, naming the client, the round and the entry; the others are aggregated and
    the diverged client's optimizer state stays as it was before the round."""
    from lptfl.sim import client_side

    config = RunConfig(compile="off", model_width=4, num_clients=3, frac=1.0, c_rounds=2)
    sim = Simulation(config)
    sim.run_round()
    kept = {name: array.copy() for name, array in sim.store.arrays(1).items()}
    real_updates = client_side.ClientSide._updates

    def one_diverging(self, clients, *args):
        for client, result in real_updates(self, clients, *args):
            if client == 1:
                result.state = {**result.state, "classifier.bias": torch.full_like(result.state["classifier.bias"],
                                                                                  float("nan"))}
            yield client, result

    monkeypatch.setattr(client_side.ClientSide, "_updates", one_diverging)
    second = sim.run_round()
    assert second.accepted == 2 and second.rejected == 1 and not second.skipped
    assert "client 1: its training diverged in round 2 ('classifier.bias'" in second.rejected_reasons[0]
    assert all(bool(torch.isfinite(v).all()) for v in sim.server.global_state.values() if v.is_floating_point())
    after = sim.store.arrays(1)
    assert after.keys() == kept.keys() and all(np.array_equal(after[name], kept[name]) for name in kept)
