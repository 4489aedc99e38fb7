"""The audit trail: record schema, store, group-commit writer and export. Stands alone."""
