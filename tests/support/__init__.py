"""Test doubles that speak real protocols over real sockets (Kubernetes API, kubelet)."""
