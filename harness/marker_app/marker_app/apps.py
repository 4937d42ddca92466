"""One query to every SuperNode; each ClientApp writes `marker-<node id>` into
`marker-dir` and replies with the path it wrote."""

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()
NODE_WAIT_S = 120


@server.main()
def main(grid: Grid, context: Context) -> None:
    wanted = int(context.run_config["wait-for-nodes"])
    deadline = time.monotonic() + NODE_WAIT_S
    while len(node_ids := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"found {len(node_ids)} of {wanted} SuperNodes")
        time.sleep(0.5)
    queries = [Message(RecordDict(), dst_node_id=node_id, message_type="query") for node_id in node_ids]
    replies = list(grid.send_and_receive(queries, timeout=NODE_WAIT_S))
    if failed := [reply.error for reply in replies if reply.has_error()]:
        raise RuntimeError(f"ClientApps failed: {failed}")


@client.query()
def leave_marker(message: Message, context: Context) -> Message:
    marker = Path(str(context.run_config["marker-dir"])) / f"marker-{context.node_id}"
    marker.write_text(f"written by a ClientApp of run {context.run_id}\n")
    return Message(RecordDict({"marker": ConfigRecord({"path": str(marker)})}), reply_to=message)
