"""LPT-FL on a Flower federation (Flower >= 1.42, ``pip install lptfl[flower]``).

- :mod:`lptfl.flower.server_app` — the ``ServerApp`` (``lptfl.flower.server_app:app``).
- :mod:`lptfl.flower.client_app` — the ``ClientApp`` (``lptfl.flower.client_app:app``).
- :mod:`lptfl.flower.config` — Flower run config <-> :class:`lptfl.experiment.config.RunConfig`.
- :mod:`lptfl.flower.local` — a local federation (SuperLink + SuperNodes) for ``lptfl flower-local``.

Importing this package does not import Flower; its submodules (except ``config`` and
``local``) do.
"""
