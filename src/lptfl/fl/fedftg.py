"""FedFTG (Zhang et al., CVPR 2022): data-free fine-tuning of the aggregated model on the
server (REFERENCE §6). The published low-precision code calls it ``fedtgp``.

After aggregation, the server fine-tunes the global model by distilling the round's client
models into it on images from a conditional generator ``G(z, y)``:

- the teacher is the class-level ensemble of the participating clients' models, client k
  weighted on class c by its share of class c's samples; labels are drawn from the clients'
  pooled label distribution ("customised label sampling");
- generator steps maximise the teacher's confidence in ``y`` and the student-teacher
  discrepancy (hard-sample mining) and keep outputs diverse;
- distillation steps move the student toward the teacher (KL) on generated images;
- both learning rates follow a cosine schedule over the round's iterations.

Everything runs on the server in fp32; the clients, their low-precision training and the
wire format are untouched, and the fine-tuned model then enters the moving average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lptfl.fl.ensemble import (
    class_weights,
    diversity_loss,
    load_optimizer_tensors,
    optimizer_tensors,
    sample_labels,
    soft_cross_entropy,
    weighted_teacher_logits,
)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FedFTGConfig:
    """FedFTG's settings (the published code's defaults).

    Attributes:
        gen_lr: the generator's Adam learning rate (cosine-decayed over a round's iterations).
        lr: the global model's fine-tuning learning rate (Adam, cosine-decayed).
        iterations: fine-tuning iterations per round.
        gen_rounds: generator steps per iteration.
        distill_rounds: distillation steps of the global model per iteration.
        batch_size: generated images per step.
        noise_dim: size of the noise ``z``.
        hard_weight: weight of the student-teacher discrepancy the generator maximises.
        diversity: weight of the generator's diversity loss.
    """

    gen_lr: float = 1e-2
    lr: float = 1e-4
    iterations: int = 10
    gen_rounds: int = 1
    distill_rounds: int = 5
    batch_size: int = 64
    noise_dim: int = 100
    hard_weight: float = 1.0
    diversity: float = 1.0


class ImageGenerator(nn.Module):
    """``G(z, y)``: noise times a label embedding, to a ``channels x size x size`` image whose
    per-channel statistics are normalised like the (normalised) training data."""

    def __init__(self, num_classes: int, channels: int, image_size: int, *, noise_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.image_size = image_size
        self.init_size = math.ceil(image_size / 4)
        self.embed = nn.Embedding(num_classes, noise_dim)
        self.fc = nn.Linear(noise_dim, 2 * width * self.init_size**2)
        self.width = width
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.noise_dim, generator=generator).to(self.fc.weight.device)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(z * self.embed(y))
        h = h.view(z.shape[0], 2 * self.width, self.init_size, self.init_size)
        return self.net(h)[..., : self.image_size, : self.image_size]


def _cosine(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


class FedFTGServer:
    """Fine-tunes aggregated models; holds the generator (and its optimizer) across rounds.

    Args:
        make_model: builds a fresh fp32 model of the run's architecture (no quantizers).
        num_classes: classes of the task.
        input_shape: ``(channels, height, width)`` of the task's images.
        config: the settings.
        seed: seeds the generator's initial weights.
    """

    def __init__(self, make_model: Callable[[], nn.Module], num_classes: int, input_shape: tuple[int, int, int],
                 config: FedFTGConfig, *, seed: int) -> None:
        self.config = config
        self.student = make_model()
        self.teacher = make_model().eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)
        channels, height, _ = input_shape
        self.generator = ImageGenerator(num_classes, channels, height, noise_dim=config.noise_dim)
        self.gen_optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.gen_lr)
        self.last_losses: dict[str, float] = {}

    def _teacher_logits(self, states: list[State], weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = [functional_call(self.teacher, state, (x,)) for state in states]
        return weighted_teacher_logits(logits, weights, y)

    def refine(self, aggregate: Mapping[str, torch.Tensor], states: list[State], counts: list[torch.Tensor],
               generator: torch.Generator) -> State:
        """The aggregate fine-tuned against the ensemble of ``states`` (the round's client models,
        with their label ``counts``); unchanged when no client model is given."""
        if not states:
            return {k: v.clone() for k, v in aggregate.items()}
        cfg = self.config
        weights, prior = class_weights(counts)
        student, g = self.student, self.generator
        student.load_state_dict(aggregate)
        optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        totals = {"generator": 0.0, "distill": 0.0}
        for it in range(cfg.iterations):
            for group in self.gen_optimizer.param_groups:
                group["lr"] = _cosine(cfg.gen_lr, it, cfg.iterations)
            for group in optimizer.param_groups:
                group["lr"] = _cosine(cfg.lr, it, cfg.iterations)
            g.train()
            student.eval()
            for p in student.parameters():
                p.requires_grad_(False)
            for _ in range(cfg.gen_rounds):
                y = sample_labels(prior, cfg.batch_size, generator)
                z = g.noise(cfg.batch_size, generator)
                x = g(z, y)
                teacher = self._teacher_logits(states, weights, x, y)
                fidelity = F.cross_entropy(teacher, y)
                discrepancy = soft_cross_entropy(student(x), F.softmax(teacher, dim=1)).mean()
                loss = fidelity - cfg.hard_weight * discrepancy + cfg.diversity * diversity_loss(z, x)
                self.gen_optimizer.zero_grad()
                loss.backward()
                self.gen_optimizer.step()
                totals["generator"] = float(fidelity.detach())
            for p in student.parameters():
                p.requires_grad_(True)
            student.train()
            g.eval()
            for _ in range(cfg.distill_rounds):
                y = sample_labels(prior, cfg.batch_size, generator)
                with torch.no_grad():
                    x = g(g.noise(cfg.batch_size, generator), y)
                    target = F.softmax(self._teacher_logits(states, weights, x, y), dim=1)
                loss = soft_cross_entropy(student(x), target).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                totals["distill"] = float(loss.detach())
        self.last_losses = totals
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

    def state_dict(self, prefix: str = "fedftg") -> dict[str, torch.Tensor]:
        out = {f"{prefix}.gen.{k}": v.detach().cpu().clone() for k, v in self.generator.state_dict().items()}
        out.update(optimizer_tensors(self.gen_optimizer, f"{prefix}.opt"))
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], prefix: str = "fedftg") -> None:
        start = f"{prefix}.gen."
        self.generator.load_state_dict({k[len(start):]: v for k, v in tensors.items() if k.startswith(start)})
        load_optimizer_tensors(self.gen_optimizer, tensors, f"{prefix}.opt")
