"""PII and secrets redaction (see docs/redaction.md).

Importing this package is cheap; `engine` and `stage` import Presidio, so the gateway imports
them only when `redaction:` is configured.
"""
