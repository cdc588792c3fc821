"""``python -m nat4etl``: the same as the ``nat4etl`` console script."""

from nat4etl.cli import main

main()
