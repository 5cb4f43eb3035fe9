"""The assembled run says what it will do that a user may not expect."""

import logging

from lptfl.experiment.assembly import RunAssembly
from lptfl.experiment.config import RunConfig


def test_clients_without_training_samples_are_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="lptfl.experiment.assembly"):
        RunAssembly(RunConfig(num_clients=1000, frac=0.01, alpha=0.01, partition="dirichlet-plain", model_width=4))
    warned = [r.getMessage() for r in caplog.records if "hold no training samples" in r.getMessage()]
    assert len(warned) == 1 and warned[0].split(" of 1000 clients")[0].isdigit()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lptfl.experiment.assembly"):
        RunAssembly(RunConfig(num_clients=10, model_width=4))
    assert "hold no training samples" not in caplog.text
