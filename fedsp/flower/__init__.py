"""Real federations on Flower (``pip install fedsp[flower]``): fedsp's client algorithms
in a ClientApp, fedsp's server step and round loop in a ServerApp.

  records   adapters as ArrayRecords keyed by pytree path; the reply privacy check;
  settings  the run config / node config a Flower run reads, the server's limits;
  client    a node: one client's data and model, answering train/upload/identify;
  server    `serve`: `fedsp.run` whose client updates come from the nodes;
  app       the ClientApp and ServerApp the app folder ``flower_app/`` names.

The README's "Running a real federation" gives the commands.
"""

from fedsp.flower.client import Node, handle, load_node
from fedsp.flower.records import check_reply, record_to_tree, tree_to_record
from fedsp.flower.server import FlowerUpdates, message_bytes, serve
from fedsp.flower.settings import FederationSettings, load_config

__all__ = [
    "FederationSettings",
    "FlowerUpdates",
    "Node",
    "check_reply",
    "handle",
    "load_config",
    "load_node",
    "message_bytes",
    "record_to_tree",
    "serve",
    "tree_to_record",
]
