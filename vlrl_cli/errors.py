"""vlrl's own error type for bad input and usage.

The CLI turns a UserError into one line and exit code 2. Anything else raised inside a command is a bug
or a failure of the run: exit 1, its traceback written to a file the CLI names (cli.guarded).
"""


class UserError(Exception):
    """Bad input or usage: a missing file, a malformed record file, a recipe key, a flag. The message names it."""
