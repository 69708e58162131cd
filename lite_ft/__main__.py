"""`python -m lite_ft`: the same as the `lite-ft` command."""
from lite_ft.cli import entry

entry()
