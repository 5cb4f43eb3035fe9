"""The error raised for any payload that is not a valid lptfl-wire message."""

from __future__ import annotations


class PayloadError(ValueError):
    """A payload failed validation (truncated, corrupted, over a limit, or not the expected model).

    ``decode`` raises only this for any ``bytes`` input, before building any tensor from
    unverified sizes, so a caller can reject a message and keep its state untouched.
    """
