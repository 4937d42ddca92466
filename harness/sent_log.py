"""This app's ClientApp, writing down what each of its replies carries.

Tests deploy it in place of `pytorch_example.client_app:app` (see
`copy_app(..., client_app=SENT_LOG_CLIENT_APP)`). A Flower mod sees each reply on its
way out of the ClientApp and appends one JSON line to `<data-cache-dir>/sent.jsonl` (a
node with its own data: to its own cache): the message type, the partition, each
record's kind and keys, and the config the message it answers carried. Nothing here
ships with the app.
"""

import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pytorch_example import client_app
from pytorch_example.config import AppConfig
from pytorch_example.files import DEFAULT_CACHE_DIR
from pytorch_example.node_data import NodeConfig

SENT_LOG_CLIENT_APP = "harness.sent_log:app"
SENT_LOG = "sent.jsonl"


def log_what_is_sent(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    records = {name: [type(record).__name__, sorted(record.keys())] for name, record in reply.content.items()}
    line = {
        "type": msg.metadata.message_type,
        "partition-id": context.node_config.get("partition-id"),
        "records": records,
        "received-config": dict(msg.content["config"]),
    }
    node = NodeConfig.from_node_config(context.node_config)
    if node.dataset_path is not None:  # a node of its own data reads none of the run's paths
        folder = node.cache_dir or DEFAULT_CACHE_DIR
    else:
        folder = AppConfig.for_client(
            context.run_config, msg.content["config"], own_data=False
        ).data_cache_dir
    log_file = folder / SENT_LOG
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as file:  # one short append per reply
        file.write(json.dumps(line) + "\n")
    return reply


def read_sent_log(data_cache_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (data_cache_dir / SENT_LOG).read_text().splitlines()]


app = ClientApp(mods=[log_what_is_sent])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate)
