"""The device agent: profile artifacts on a remote device over HTTP, SSH or ADB.

``protocol`` (signing, the job body, errors), ``archive`` (packing and safe
extraction), ``server`` (``AgentServer``), ``client`` (``AgentClient``),
``oneshot`` (one profile in this process; what SSH and ADB run). Run it as
``edge-compress agent serve`` or ``python -m edge_compress.profile.agent serve``.
Standard library only besides the profiler: no torch, no compression code.
"""

from edge_compress.profile.agent.client import AgentClient
from edge_compress.profile.agent.protocol import (AgentAuthError, AgentBusyError, AgentError, AgentJobTimeoutError,
                                                  AgentPayloadTooLargeError, AgentRequestError,
                                                  AgentUnreachableError)
from edge_compress.profile.agent.server import AgentLimits, AgentServer

__all__ = ["AgentAuthError", "AgentBusyError", "AgentClient", "AgentError", "AgentJobTimeoutError", "AgentLimits",
           "AgentPayloadTooLargeError", "AgentRequestError", "AgentServer", "AgentUnreachableError"]
