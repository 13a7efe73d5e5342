"""The server's Kubernetes parts: k8s_psat clusters and their API clients.

Configured under ``[node_attestors.k8s_psat.clusters.<name>]`` (see
docs/configuration.md and docs/kubernetes.md).
"""
