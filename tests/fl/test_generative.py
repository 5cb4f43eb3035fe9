"""FedGen and FedFTG (lptfl.fl.fedgen, lptfl.fl.fedftg, lptfl.fl.ensemble): their defining properties."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lptfl.fl import LocalTrainer
from lptfl.fl.ensemble import (
    class_weights,
    label_counts,
    load_optimizer_tensors,
    optimizer_tensors,
    sample_labels,
    weighted_teacher_logits,
)
from lptfl.fl.fedftg import FedFTGConfig, FedFTGServer, ImageGenerator
from lptfl.fl.fedgen import (
    FeatureGenerator,
    FedGenConfig,
    FedGenObjective,
    FedGenServer,
)
from lptfl.models import MLP
from lptfl.quant import PrecisionPolicy


def test_class_weights_share_each_class_among_its_holders():
    counts = [torch.tensor([3, 0, 1]), torch.tensor([1, 0, 3])]
    weights, prior = class_weights(counts)
    assert torch.allclose(weights[:, 0], torch.tensor([0.75, 0.25]))
    assert torch.equal(weights[:, 1], torch.zeros(2))  # nobody holds class 1
    assert torch.allclose(prior, torch.tensor([0.5, 0.0, 0.5]))
    assert torch.equal(label_counts(torch.tensor([2, 2, 0]), 3), torch.tensor([1, 0, 2]))


def test_weighted_teacher_logits_weight_each_client_by_the_sample_label():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    weights = torch.tensor([[1.0, 0.2, 0.5], [0.0, 0.8, 0.5]])
    y = torch.tensor([0, 1, 2, 1])
    out = weighted_teacher_logits([a, b], weights, y)
    expected = torch.stack([weights[0, y[i]] * a[i] + weights[1, y[i]] * b[i] for i in range(4)])
    assert torch.allclose(out, expected)


def test_optimizer_state_round_trips_through_flat_tensors():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    flat = optimizer_tensors(opt, "x")
    other = torch.optim.Adam(model.parameters(), lr=0.1)
    load_optimizer_tensors(other, flat, "x")
    assert set(optimizer_tensors(other, "x")) == set(flat)
    assert all(torch.equal(optimizer_tensors(other, "x")[k], v) for k, v in flat.items())


def _toy_heads(classes: int = 4):
    """Client heads that read class c off feature c: client 0 knows classes 0-1, client 1 classes 2-3."""
    eye = torch.eye(classes) * 4
    heads = [(eye.clone(), torch.zeros(classes)), (eye.clone(), torch.zeros(classes))]
    counts = [torch.tensor([50, 50, 0, 0]), torch.tensor([0, 0, 50, 50])]
    return heads, counts


def ensemble_accuracy(server: FedGenServer, heads, counts, n: int, generator: torch.Generator) -> float:
    """How often the class-weighted ensemble of ``heads`` labels ``G(z, y)`` as ``y`` (``n`` samples)."""
    weights, prior = class_weights(counts)
    g = server.generator.eval()
    y = sample_labels(prior, n, generator)
    features = g(g.noise(n, generator), y)
    logits = weighted_teacher_logits([F.linear(features, w.float(), b.float()) for w, b in heads], weights, y)
    return float((logits.argmax(1) == y).double().mean())


def test_fedgen_generator_learns_features_the_ensemble_labels_correctly():
    heads, counts = _toy_heads()
    server = FedGenServer(4, 4, FedGenConfig(lr=1e-2, steps=1), seed=0)
    g = torch.Generator().manual_seed(0)
    first = server.train(heads, counts, g)
    before = ensemble_accuracy(server, heads, counts, 256, torch.Generator().manual_seed(1))
    for _ in range(150):
        last = server.train(heads, counts, g)
    after = ensemble_accuracy(server, heads, counts, 256, torch.Generator().manual_seed(1))
    assert last < 0.5 * first
    assert after > 0.9 and after > before
    assert torch.equal(server.labels, torch.arange(4))
    restored = FedGenServer(4, 4, FedGenConfig(lr=1e-2, steps=1), seed=1)
    restored.load_state_dict(server.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.generator.state_dict().values(),
                                                   server.generator.state_dict().values()))


def test_fedgen_coefficients_decay_per_round():
    server = FedGenServer(3, 5, FedGenConfig(alpha=0.1, beta=2.5, decay=0.5), seed=0)
    assert server.coefficients(1) == (0.1, 2.5)
    assert server.coefficients(3) == (0.1 * 0.25, 2.5 * 0.25)


def test_fedgen_objective_terms():
    torch.manual_seed(0)
    model = MLP(1, 3, 8, hidden=6)
    generator = FeatureGenerator(3, 6, noise_dim=4, hidden=5)
    objective = FedGenObjective(generator, batch_size=7)
    objective.set_round(0.0, 0.0, torch.tensor([0, 2]))
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    inputs = objective.inputs(y, torch.Generator().manual_seed(0))
    features_y, sampled, features_s = inputs[:3]
    assert features_y.shape == (5, 6) and features_s.shape == (7, 6)
    assert set(sampled.tolist()) <= {0, 2}
    logits = model(x)
    weight = torch.ones(5)
    assert float(FedGenObjective.extra_loss(model, logits, y, weight, *inputs).detach()) == 0.0
    alpha, beta = torch.tensor(0.3), torch.tensor(0.0)
    got = FedGenObjective.extra_loss(model, logits, y, weight, features_y, sampled, features_s, alpha, beta)
    assert torch.allclose(got, 0.3 * F.cross_entropy(model.classifier(features_s), sampled))
    # the KL term vanishes when the model already predicts what the generated features say
    same = FedGenObjective.extra_loss(model, model.classifier(features_y), y, weight, features_y, sampled,
                                      features_s, torch.tensor(0.0), torch.tensor(1.0))
    assert abs(float(same.detach())) < 1e-6


def test_trainer_adds_the_objective_to_the_local_loss():
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))

    def run(alpha):
        torch.manual_seed(1)
        model = MLP(1, 3, 8, hidden=6)
        trainer = LocalTrainer(model, PrecisionPolicy.full_precision(), optimizer="sgd", lr=0.1)
        torch.manual_seed(2)
        objective = FedGenObjective(FeatureGenerator(3, 6, noise_dim=4, hidden=5), batch_size=8)
        objective.set_round(alpha, 0.0, torch.arange(3))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        result = trainer.train(start, x, y, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(3),
                               objective=objective)
        return result

    plain, regularised = run(0.0), run(5.0)
    assert plain.loss != regularised.loss or any(
        not torch.equal(plain.state[k], regularised.state[k]) for k in plain.state)


def _toy_teachers():
    """Two MLP teachers on 1x8x8 images, each trained on two of four classes of separable data."""
    torch.manual_seed(0)
    means = torch.randn(4, 1, 8, 8) * 2
    states, counts = [], []
    for classes in ((0, 1), (2, 3)):
        model = MLP(1, 4, 8, hidden=16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        y = torch.tensor(classes).repeat(64)
        for _ in range(60):
            x = means[y] + 0.3 * torch.randn(len(y), 1, 8, 8)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        counts.append(torch.bincount(y, minlength=4))
    return states, counts, means


def test_fedftg_fine_tuning_moves_the_student_toward_the_teacher_ensemble():
    states, counts, means = _toy_teachers()
    config = FedFTGConfig(iterations=15, distill_rounds=5, batch_size=32, lr=1e-2, gen_lr=1e-2)
    server = FedFTGServer(lambda: MLP(1, 4, 8, hidden=16), 4, (1, 8, 8), config, seed=0)
    torch.manual_seed(5)
    aggregate = {k: v.clone() for k, v in MLP(1, 4, 8, hidden=16).state_dict().items()}
    weights, _ = class_weights(counts)
    probe = torch.Generator().manual_seed(9)
    y = torch.randint(0, 4, (256,), generator=probe)
    x = means[y] + 0.3 * torch.randn(256, 1, 8, 8, generator=probe)  # real data, never shown to the server

    def gap(state):
        student = MLP(1, 4, 8, hidden=16)
        student.load_state_dict(state)
        with torch.no_grad():
            teacher = F.softmax(server._teacher_logits(states, weights, x, y), dim=1)
            return float(F.kl_div(F.log_softmax(student(x), 1), teacher, reduction="batchmean"))

    before = gap(aggregate)
    refined = server.refine(aggregate, states, counts, torch.Generator().manual_seed(0))
    assert set(refined) == set(aggregate)
    assert gap(refined) < 0.7 * before
    unchanged = server.refine(aggregate, [], [], torch.Generator())
    assert all(torch.equal(unchanged[k], aggregate[k]) for k in aggregate)


def test_fedftg_generator_fidelity_improves_across_rounds():
    states, counts, _ = _toy_teachers()
    config = FedFTGConfig(iterations=5, distill_rounds=1, batch_size=32, hard_weight=0.0)
    server = FedFTGServer(lambda: MLP(1, 4, 8, hidden=16), 4, (1, 8, 8), config, seed=0)
    aggregate = {k: v.clone() for k, v in MLP(1, 4, 8, hidden=16).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    server.refine(aggregate, states, counts, g)
    first = server.last_losses["generator"]
    for _ in range(8):
        server.refine(aggregate, states, counts, g)
    assert server.last_losses["generator"] < 0.5 * first


def test_image_generator_shapes():
    for size in (8, 28, 32):
        g = ImageGenerator(10, 3, size, noise_dim=16, width=8)
        assert g(g.noise(4), torch.arange(4)).shape == (4, 3, size, size)
