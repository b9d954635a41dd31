"""vlrl's own error type for bad input and usage.

The CLI turns a UserError into one line and exit code 2. Anything else raised inside a command is a bug
or a failure of the run: exit 1, its traceback written to a file the CLI names (cli.guarded).
"""


import re


def stable_message(e: BaseException) -> str:
    """An exception's message without object addresses ("<_io.BytesIO object at 0x7f...>"), so files that
    record reasons (rejects.jsonl) are byte-identical between identical runs."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip()


class UserError(Exception):
    """Bad input or usage: a missing file, a malformed record file, a recipe key, a flag. The message names it."""
