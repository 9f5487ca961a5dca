"""The base exception of a bad input found by the command-line layer.

This module is a base utility (docs/design.md): it imports nothing else of clara_jax, so any
module may raise UserError. Which exceptions `clara` reports as one line, and how, is decided
in `clara_jax.cli` (`user_errors`), the one module that may know every room's exceptions.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input found by the command-line layer; the message names the flag or file."""
