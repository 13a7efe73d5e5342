"""``python -m ca.cli``: the same as the ``sigil-server`` console script."""

from ca.cli import main

main()
