"""A Flower ``Grid`` that delivers each message to a Python function in this process: the
Strategy API (``Strategy.start``) with no SuperLink, no SuperNodes and no processes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

Handler = Callable[[Message], Message]


class LoopbackGrid(Grid):
    """Nodes ``node_ids``; ``handle(message) -> reply`` plays every node's ClientApp.

    ``replies`` collects every reply, in order.
    """

    def __init__(self, node_ids: Iterable[int], handle: Handler) -> None:
        self.node_ids = list(node_ids)
        self.handle = handle
        self.replies: list[Message] = []

    def set_run(self, run_id):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):  # pragma: no cover - Strategy.start uses send_and_receive
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink would assign
            replies.append(self.handle(msg))
        self.replies += replies
        return replies
