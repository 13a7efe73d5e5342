"""The server's Kubernetes parts: the bundle ConfigMap notifier and the registration controller.

Configured under ``[kubernetes]`` and ``[node_attestors.k8s_psat.clusters.<name>]``
(parsed in ca/config/kubernetes.py; see docs/configuration.md and docs/kubernetes.md).
"""
