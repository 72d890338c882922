"""fedsp-toy-app: the ClientApp adds its partition id to the arrays it receives."""

import os
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Reply with `arrays + partition-id`, the partition id and the echoed variable."""
    config = msg.content["config"]
    if int(config["server-round"]) >= int(context.run_config["sleep-from-round"]):
        time.sleep(float(context.run_config["client-sleep-s"]))
    partition_id = int(context.node_config["partition-id"])
    arrays = [a + partition_id for a in msg.content["arrays"].to_numpy_ndarrays()]
    env_name = str(context.run_config["echo-env"])
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord({"partition-id": partition_id, "pid": os.getpid()}),
            # MetricRecords hold numbers only: the variable's text goes in a ConfigRecord.
            "echo": ConfigRecord(
                {
                    "env": os.environ.get(env_name, "<unset>"),
                    "pythonpath": os.environ.get("PYTHONPATH", "<unset>"),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)
