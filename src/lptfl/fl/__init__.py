"""Client updates and server aggregation, shared by the in-process simulator and the Flower apps."""

from lptfl.fl.aggregate import RunningMean, moving_average
from lptfl.fl.client import LocalTrainer, TrainResult, evaluate, make_optimizer
from lptfl.fl.client_state import ClientStateStore
from lptfl.fl.server import Server, ServerConfig, full_precision_names

__all__ = [
    "ClientStateStore",
    "LocalTrainer",
    "RunningMean",
    "Server",
    "ServerConfig",
    "TrainResult",
    "evaluate",
    "full_precision_names",
    "make_optimizer",
    "moving_average",
]
