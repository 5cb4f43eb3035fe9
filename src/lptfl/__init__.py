"""lptfl: low-precision local training for federated learning.

Implements "Low Precision Local Training is Enough for Federated Learning" (NeurIPS 2024):
clients train and communicate in block floating point, the server aggregates in full
precision and serves a moving average of the global model.
"""

__version__ = "0.1.0"
