"""Attestation plugins: each module holds an attestor's two halves.

The agent half produces attestation data; the server half verifies it and derives
an identity and selectors. Both halves of a plugin live together so the format
they share is defined once.
"""
