"""The Flower components of a fedsp federation: ``client_app`` (a node) and
``server_app`` (the server), named by the app folder's pyproject (``flower_app/``).

``flwr run flower_app <federation>`` starts ``server_app`` on the SuperLink with the run
config (`fedsp.flower.settings`); each SuperNode runs ``client_app`` with its node config.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsp.flower import client, server

__all__ = ["client_app", "server_app"]

client_app = ClientApp()
server_app = ServerApp()


def _reply(message: Message, context: Context) -> Message:
    content = client.handle(message, context.run_config, context.node_config, context.state)
    return Message(content, reply_to=message)


client_app.train()(_reply)
client_app.train("upload")(_reply)
client_app.query("identify")(_reply)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    server.serve(grid, context.run_config)
