"""Audit sinks: the trail streamed to a SIEM, a syslog server or a file as it is written.

Delivery reads the durable trail (never memory) after a cursor kept per sink and instance chain in
the state DB, so it is at-least-once and in chain order, survives restarts, and a sink that is down
costs the calls nothing: their records wait in the audit store. See docs/audit.md, "Sinks".
"""
