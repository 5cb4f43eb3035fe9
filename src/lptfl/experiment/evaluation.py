"""Scoring the served model on the test set: with fp32 activations and with the run's activation format.

Both drivers (the simulator and the Flower ServerApp) score the served model through
:class:`ServedModelScorer` in every round that :func:`is_evaluated`, and record both scores:
``test_accuracy_fp32_act`` / ``test_loss_fp32_act`` (a model without activation quantizers) and
``test_accuracy_policy_act`` / ``test_loss_policy_act`` (the model prepared with the run's precision
policy: its activation and error quantizers and, where the operands fit, bf16 products).
``test_accuracy`` / ``test_loss`` repeat one of them, chosen by ``--eval_precision``
(:meth:`~lptfl.experiment.config.RunConfig.scored_activations`). Accuracies are fractions in [0, 1],
losses mean cross-entropies in nats. When the policy quantizes no activations (fp32 runs) the two
models are the same: it is evaluated once and both names get its score.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lptfl.data import Dataset
from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import LAST_ROUNDS, TEST_FIELDS
from lptfl.experiment.setup import build_run_model
from lptfl.fl.client import evaluate_sums
from lptfl.fl.algorithms import vote_accuracy
from lptfl.quant.compiled import MaybeCompiled

# relative L2 difference allowed between the compiled and the eager logits of the first batch: 8-bit
# rounding flips alone move them by ~1.5%, a miscompiled forward by O(1) (docs/evaluation.md)
EVAL_TOLERANCE = 0.1


def is_evaluated(config: RunConfig, round_index: int) -> bool:
    """Whether round ``round_index`` (1-based) scores the served model: every ``--eval_every``
    rounds, and always the last :data:`LAST_ROUNDS` rounds of ``--c_rounds`` (the summary's window)."""
    return round_index % config.eval_every == 0 or round_index > config.c_rounds - LAST_ROUNDS


def not_evaluated() -> dict[str, None]:
    """The test metrics of a round that did not score the served model: all None (JSON null)."""
    return dict.fromkeys(TEST_FIELDS)


class ServedModelScorer:
    """The served model's test scores with fp32 activations and with the run's activation format.

    Args:
        config: the run's settings (model, precision policy, ``--eval_precision``, test batch size).
        data: the run's dataset; its test split is scored.
        device: where the evaluation models live.
        compile: compile the forward of the model with the run's activation format (the fp32 one is
            compiled only when it is the only model, i.e. when the policy quantizes no activations:
            without quantizers to fuse, compiling it would cost start-up time for little).
        verify: tolerance of the compiled forward's check against eager (see ``MaybeCompiled``).
    """

    def __init__(self, config: RunConfig, data: Dataset, device: torch.device, *, compile: bool = False,
                 verify: float | None = EVAL_TOLERANCE) -> None:
        self.test_x, self.test_y, self.num_classes = data.test_x, data.test_y, data.num_classes
        self.batch_size = config.test_batch_size
        self.scored = config.scored_activations()
        policy = config.policy()
        fp32 = build_run_model(config, data).to(device)
        only = not policy.quantizes_activations
        self._models = {"fp32_act": (fp32, MaybeCompiled(fp32, enabled=compile and only, verify=verify,
                                                         mode=config.compile_mode))}
        if not only:
            model = build_run_model(config, data).to(device)
            policy.prepare_model(model, data.train_x[: config.batch_size].to(device))
            self._models["policy_act"] = (model, MaybeCompiled(model, enabled=compile, verify=verify,
                                                               mode=config.compile_mode))
        self.model, self.forward = self._models.get(self.scored, self._models["fp32_act"])

    @property
    def batches(self) -> int:
        """Test batches of ``test_batch_size`` images (the last may be short)."""
        return -(-int(self.test_y.shape[0]) // self.batch_size)

    def score(self, served: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The test metrics (the :data:`TEST_FIELDS`) of the served model state ``served``."""
        return self.combine([self.sums(served, range(self.batches))])

    def sums(self, served: Mapping[str, torch.Tensor], batches: range) -> dict[str, tuple[float, int, int]]:
        """Per scoring model, ``(summed loss in nats, correct, images)`` of the served model state
        ``served`` on test batches ``batches`` (a part of :attr:`batches`; the parts of a split add up to
        the whole's scores, batch by batch as in :meth:`score`)."""
        rows = slice(batches.start * self.batch_size, batches.stop * self.batch_size)
        pad = int(self.test_y.shape[0]) > self.batch_size
        results = {}
        for name, (model, forward) in self._models.items():
            model.load_state_dict(served)
            results[name] = evaluate_sums(model, self.test_x[rows], self.test_y[rows], batch_size=self.batch_size,
                                          forward=forward, pad=pad)
        return results

    def combine(self, parts: list[dict[str, tuple[float, int, int]]]) -> dict[str, float]:
        """The test metrics from the :meth:`sums` of the parts of the test set."""
        results = {}
        for name in parts[0]:
            loss_sum, correct, count = (sum(part[name][i] for part in parts) for i in range(3))
            results[name] = (loss_sum / max(count, 1), correct / max(count, 1))
        results.setdefault("policy_act", results["fp32_act"])
        loss, accuracy = results[self.scored]
        scores = {"test_accuracy": accuracy, "test_loss": loss}
        for name, (loss, accuracy) in results.items():
            scores[f"test_accuracy_{name}"], scores[f"test_loss_{name}"] = accuracy, loss
        return scores

    def vote_accuracy(self, states: list[Mapping[str, torch.Tensor]]) -> float | None:
        """Test accuracy (fraction) of the majority vote of the scoring model loaded with each of
        ``states`` (FedBN's participants); None without states."""
        if not states:
            return None
        return vote_accuracy(self.model, states, self.test_x, self.test_y, self.num_classes,
                             batch_size=self.batch_size, forward=self.forward)
