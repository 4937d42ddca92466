"""A Flower `Grid` whose SuperNodes are ClientApp functions called in this process.

For measurements that need many runs of the app's own round loop, reply gate,
strategies and ClientApp code, without Flower's transport around them: a message is
answered by calling the ClientApp's `train` or `evaluate` function with the addressed
node's `Context`, which lives as long as the grid (so each client keeps its head in
`context.state`, as a SuperNode would). What Flower's transport adds (a process per
message, serialisation, polling) changes no aggregate, only seconds.
"""

import itertools
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict

ClientFunction = Callable[[Message, Context], Message]


class ClientAppGrid:
    """`num_nodes` SuperNodes, node `i` (ids 1..n) with `node_configs[i - 1]`, answering
    with `train` and `evaluate` (a ClientApp's two functions) at once."""

    def __init__(
        self, run_config: dict, node_configs: list[dict], train: ClientFunction, evaluate: ClientFunction
    ) -> None:
        self.contexts = {
            node_id: Context(
                run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config
            )
            for node_id, node_config in enumerate(node_configs, start=1)
        }
        self.functions = {"train": train, "evaluate": evaluate}
        self.ids = itertools.count()
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            # As the SuperLink does when it accepts a message.
            message.metadata.__dict__["_message_id"] = f"message-{next(self.ids)}"
            self.pending[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        replies = []
        for message_id in list(message_ids):
            message = self.pending.pop(message_id)
            function = self.functions[message.metadata.message_type.partition(".")[0]]
            replies.append(function(message, self.contexts[message.metadata.dst_node_id]))
        return replies
