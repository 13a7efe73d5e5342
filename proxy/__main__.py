"""``python -m proxy``: the same as the ``sigil-proxy`` console script."""

from proxy.cli import main

main()
