"""`python -m allinone` runs the command-line interface."""

from allinone.cli import main

raise SystemExit(main())
