"""`python -m fastres ...`: the one place the library reaches into tools/ (the CLI)."""
import sys

from fastres.tools.cli import main

sys.exit(main())
