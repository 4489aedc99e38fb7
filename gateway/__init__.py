"""Bastion: a governance proxy for AI agents."""
