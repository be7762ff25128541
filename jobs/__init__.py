"""Thin Ray job entrypoints: `python -m jobs.<name> --config jobs/configs/<x>.yaml`."""

import sys


def entrypoint(command: str) -> None:
    """Run one `metaaligner` subcommand on the cluster the job runs in (Ray sets RAY_ADDRESS)."""
    from metaaligner.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
