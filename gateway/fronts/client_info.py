"""The client-info header: which agent framework (or tool) sent a call, for the audit record.

`X-Bastion-Client: langchain/1.7.2` is self-declared by the caller and not authenticated: the
audit keeps it in its own field (`client`), apart from `user` and `agent`, which come from the
verified credential. A malformed value is refused rather than cleaned, so what the record says
is exactly what the client sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.errors import ProtocolError

HEADER = "x-bastion-client"
MAX_LENGTH = 100
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+:@() -]{0,99}")


def client_name(headers: Mapping[str, str]) -> str | None:
    """The declared client (`name/version`), None when absent; ProtocolError when malformed."""
    value = headers.get(HEADER)
    if value is None:
        return None
    value = value.strip()
    if not _VALID.fullmatch(value):
        raise ProtocolError(
            f"the X-Bastion-Client header must be 1 to {MAX_LENGTH} characters of letters, digits "
            "and ._/+:@()- or space, like 'langchain/1.7.2'"
        )
    return value
