"""Flower `Grid`s whose SuperNodes answer in this process, at once.

`LocalGrid` does what a SuperLink does with messages (gives each an id, hands back one
reply per message); a subclass says how a node replies. `ClientAppGrid` replies by
calling a ClientApp's `train` or `evaluate` function with the addressed node's
`Context`, which lives as long as the grid (so each client keeps its head in
`context.state`, as a SuperNode would): measurements that need many runs of the app's
own round loop, reply gate, strategies and ClientApp code get them without Flower's
transport, which changes no aggregate, only seconds (a process per message,
serialisation, polling).
"""

import itertools
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict

ClientFunction = Callable[[Message, Context], Message]


class LocalGrid:
    """SuperNodes `node_ids`, each message answered by `reply_to` when pulled."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        self.ids = itertools.count()
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            # As the SuperLink does when it accepts a message.
            message.metadata.__dict__["_message_id"] = f"message-{next(self.ids)}"
            self.pending[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.reply_to(self.pending.pop(message_id)) for message_id in list(message_ids)]

    def reply_to(self, message: Message) -> Message:
        raise NotImplementedError


class ClientAppGrid(LocalGrid):
    """Node `i` (ids 1..n) with `node_configs[i - 1]`, replying with `train` and
    `evaluate` (a ClientApp's two functions)."""

    def __init__(
        self, run_config: dict, node_configs: list[dict], train: ClientFunction, evaluate: ClientFunction
    ) -> None:
        super().__init__(range(1, len(node_configs) + 1))
        self.contexts = {
            node_id: Context(
                run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config
            )
            for node_id, node_config in enumerate(node_configs, start=1)
        }
        self.functions = {"train": train, "evaluate": evaluate}

    def reply_to(self, message: Message) -> Message:
        function = self.functions[message.metadata.message_type.partition(".")[0]]
        return function(message, self.contexts[message.metadata.dst_node_id])
