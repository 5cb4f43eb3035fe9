"""FedGen (Zhu et al., ICML 2021): a server-side generator of classifier-input features
regularises the clients' local training (REFERENCE §6).

Server: a label-conditioned generator ``G(z, y) -> h`` (``h`` has the classifier's input
size) is trained each round so that the participating clients' classifier heads, weighted
per class by their share of that class's samples, label ``G(z, y)`` as ``y``; a diversity
term keeps it from collapsing. It travels to the clients with the downlink (quantized like
the model; its bytes are counted).

Client: the local loss gains ``beta_t * KL(softmax(head(G(z, y))) || softmax(model(x)))``
over the batch's labels and ``alpha_t * CE(head(G(z, y_s)), y_s)`` over labels ``y_s``
sampled from the classes the generator knows; both coefficients decay by ``decay`` per round.
Low precision is unchanged: the client's model, its quantizers and the wire format are the
same as under FedAvg; the generator's features enter the quantized classifier head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lptfl.fl.ensemble import (
    class_weights,
    diversity_loss,
    load_optimizer_tensors,
    optimizer_tensors,
    sample_labels,
)


@dataclass(frozen=True)
class FedGenConfig:
    """FedGen's settings (the published code's defaults).

    Attributes:
        alpha: initial weight of the generated-label cross-entropy on the clients.
        beta: initial weight of the KL term on the clients.
        decay: per-round factor of both weights (``alpha_t = alpha * decay**(t-1)``).
        lr: the generator's Adam learning rate (the published "ensemble lr").
        batch_size: generated samples per generator step and per client step.
        noise_dim: size of the noise ``z``.
        hidden: the generator's hidden width.
        steps: generator steps per round.
        diversity: weight of the diversity loss in the generator's objective.
    """

    alpha: float = 0.1
    beta: float = 2.5
    decay: float = 0.98
    lr: float = 3e-4
    batch_size: int = 32
    noise_dim: int = 32
    hidden: int = 32
    steps: int = 5
    diversity: float = 1.0


class FeatureGenerator(nn.Module):
    """``G(z, y)``: noise and a one-hot label to a ``feature_dim`` feature vector."""

    def __init__(self, num_classes: int, feature_dim: int, *, noise_dim: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, feature_dim),
        )

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.net[0].weight.device
        return torch.randn(n, self.noise_dim, generator=generator).to(device)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y.to(torch.int64), self.num_classes).to(z.dtype)
        return self.net(torch.cat([z, onehot], dim=1))


class FedGenObjective:
    """The client's extra loss terms; one object for the whole run (the compiled training
    step is specialised to it once). The server updates its generator and coefficients.

    Args:
        generator: the clients' copy of the generator (what the downlink carried).
        batch_size: generated samples per step for the cross-entropy term.
    """

    def __init__(self, generator: FeatureGenerator, batch_size: int) -> None:
        self.generator = generator.eval()
        self.batch_size = batch_size
        self.labels = torch.arange(generator.num_classes)
        self.alpha = torch.zeros(())
        self.beta = torch.zeros(())

    def set_round(self, alpha: float, beta: float, labels: torch.Tensor) -> None:
        self.alpha = torch.tensor(float(alpha))
        self.beta = torch.tensor(float(beta))
        self.labels = labels.to(torch.int64).cpu()

    @torch.no_grad()
    def inputs(self, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Generated features for the batch's labels ``y`` and for sampled labels (no gradient)."""
        device = y.device
        pick = torch.randint(len(self.labels), (self.batch_size,), generator=generator)
        sampled = self.labels[pick].to(device)
        g = self.generator
        features_y = g(g.noise(int(y.shape[0]), generator), y)
        features_s = g(g.noise(self.batch_size, generator), sampled)
        return features_y.to(device), sampled, features_s.to(device), self.alpha.to(device), self.beta.to(device)

    @staticmethod
    def extra_loss(
        model: nn.Module,
        logits: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
        features_y: torch.Tensor,
        sampled: torch.Tensor,
        features_s: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """``beta * KL(head(G(z, y)) || model(x)) + alpha * CE(head(G(z, y_s)), y_s)``; ``weight``
        (0 for padding rows) weights the per-sample KL terms."""
        target = F.softmax(model.classifier(features_y), dim=1).detach()
        kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(1)
        kl = (kl * weight).sum() / weight.sum()
        teacher = F.cross_entropy(model.classifier(features_s), sampled)
        return beta * kl + alpha * teacher


class FedGenServer:
    """The server side: the generator, its optimizer, and one training pass per round.

    Args:
        num_classes: classes of the task.
        feature_dim: the classifier head's input size.
        config: the settings.
        seed: seeds the generator's initial weights.
    """

    def __init__(self, num_classes: int, feature_dim: int, config: FedGenConfig, *, seed: int) -> None:
        self.config = config
        torch.manual_seed(seed)
        self.generator = FeatureGenerator(num_classes, feature_dim, noise_dim=config.noise_dim, hidden=config.hidden)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.lr)
        self.labels = torch.arange(num_classes)  # classes seen in the last round's clients
        self.last_loss: float | None = None

    def coefficients(self, round_index: int) -> tuple[float, float]:
        """``(alpha_t, beta_t)`` of round ``round_index`` (1-based)."""
        factor = self.config.decay ** max(round_index - 1, 0)
        return self.config.alpha * factor, self.config.beta * factor

    def train(self, heads: list[tuple[torch.Tensor, torch.Tensor]], counts: list[torch.Tensor],
              generator: torch.Generator) -> float:
        """``config.steps`` Adam steps of the generator against the clients' heads.

        Args:
            heads: each participating client's classifier ``(weight [classes x features], bias)``.
            counts: their label counts (``classes`` each), in the same order.
            generator: drives the label and noise draws.

        Returns:
            The last step's ensemble cross-entropy (nats).
        """
        weights, prior = class_weights(counts)
        self.labels = torch.nonzero(prior > 0).reshape(-1)
        g, cfg = self.generator.train(), self.config
        loss_value = float("nan")
        for _ in range(cfg.steps):
            y = sample_labels(prior, cfg.batch_size, generator)
            z = g.noise(cfg.batch_size, generator)
            features = g(z, y)
            per_client = [F.linear(features, w.float(), b.float()) for w, b in heads]
            teacher = sum(
                (F.cross_entropy(logits, y, reduction="none") * weights[k, y]).mean()
                for k, logits in enumerate(per_client)
            )
            loss = teacher + cfg.diversity * diversity_loss(z, features)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss_value = float(teacher.detach())
        self.last_loss = loss_value
        return loss_value

    @torch.no_grad()
    def state_dict(self, prefix: str = "fedgen") -> dict[str, torch.Tensor]:
        out = {f"{prefix}.gen.{k}": v.detach().cpu().clone() for k, v in self.generator.state_dict().items()}
        out.update(optimizer_tensors(self.optimizer, f"{prefix}.opt"))
        out[f"{prefix}.labels"] = self.labels.clone()
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], prefix: str = "fedgen") -> None:
        start = f"{prefix}.gen."
        self.generator.load_state_dict({k[len(start):]: v for k, v in tensors.items() if k.startswith(start)})
        load_optimizer_tensors(self.optimizer, tensors, f"{prefix}.opt")
        if f"{prefix}.labels" in tensors:
            self.labels = tensors[f"{prefix}.labels"].clone()
