"""`python -m unipixel`: see unipixel/cli.py."""
from .cli import main

raise SystemExit(main())
