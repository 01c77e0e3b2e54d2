"""``python -m edge_compress.profile.agent serve | token | oneshot``: the agent on a device without the full CLI."""

import sys

from edge_compress.cli.agent_cmd import main

sys.exit(main(prog="python -m edge_compress.profile.agent"))
