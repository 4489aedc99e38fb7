"""The audit trail: record schema, store, write-ahead writer, chain, verify, export, report. Stands alone."""

import logging

# Alembic announces its plug-ins and dialect at INFO on every start: noise in every command.
# `audit.migrations` logs the upgrades it applies itself.
for _name in ("alembic.runtime.plugins", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)
