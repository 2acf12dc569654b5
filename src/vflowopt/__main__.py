"""`python -m vflowopt ...` is the `vflowopt` command."""

from .cli import main

raise SystemExit(main())
