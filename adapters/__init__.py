"""Client-side shims that route a framework's tool calls through Bastion.

`adapters.client` is the HTTP client every adapter uses; the framework modules
(`adapters.langchain`, `adapters.openai_agents`, `adapters.anthropic`, `adapters.autogen`) need
their framework installed (`pip install 'bastion[langchain]'`, ...). Nothing here imports the
gateway: adapters speak HTTP to a running Bastion.
"""

from adapters.client import (
    ApprovalRequired,
    AsyncBastionClient,
    BadRequest,
    BastionClient,
    BastionError,
    BudgetExceeded,
    CredentialRejected,
    Decision,
    GatewayError,
    Reason,
    ToolDenied,
    ToolError,
    ToolResult,
    ToolSpec,
    UpstreamFailed,
)

__all__ = [
    "ApprovalRequired",
    "AsyncBastionClient",
    "BadRequest",
    "BastionClient",
    "BastionError",
    "BudgetExceeded",
    "CredentialRejected",
    "Decision",
    "GatewayError",
    "Reason",
    "ToolDenied",
    "ToolError",
    "ToolResult",
    "ToolSpec",
    "UpstreamFailed",
]
