"""`python -m cloudops_execution_engine`: the same as the `cloudops-exec` command."""

from .cli import main

main(prog_name="cloudops-exec")
