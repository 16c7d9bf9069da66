"""`linear-export`: one click group; each command lives in its own module."""

from __future__ import annotations

import signal
import sys
import threading

import click

from ..errors import UserError


class Group(click.Group):
    """Turns a UserError into one sentence on stderr and exit code 2, with no traceback."""

    def main(self, *args, **kwargs):
        """SIGTERM (a kill, a timeout) exits through Python, so partial outputs are removed."""
        if threading.current_thread() is not threading.main_thread():
            return super().main(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return super().main(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: every staging directory's cleanup runs


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="linear-export")
def main() -> None:
    """Export autoregressive image generators with a small, fixed-capacity KV cache (LineAR)."""


def _register() -> None:
    from .build import build
    from .generate import generate
    from .verify import verify

    main.add_command(generate)
    main.add_command(build)
    main.add_command(verify)
    from .eval import eval_command

    main.add_command(eval_command)
    from .bench import bench_command as bench

    main.add_command(bench)
    from .demo import demo

    main.add_command(demo)
    from .calibrate import calibrate

    main.add_command(calibrate)
    from .sample import sample

    main.add_command(sample)


_register()
