"""vlrl's own error type for bad input and usage.

The CLI turns a UserError into one line and exit code 2. Anything else raised inside a command is a bug
or a failure of the run: exit 1, its traceback written to a file the CLI names (cli.guarded).
"""


import errno
import re


def stable_message(e: BaseException) -> str:
    """An exception's message without object addresses ("<_io.BytesIO object at 0x7f...>"), so files that
    record reasons (rejects.jsonl) are byte-identical between identical runs."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip()


class UserError(Exception):
    """Bad input or usage: a missing file, a malformed record file, a recipe key, a flag. The message names it."""


# what an errno of the user's machine means, in words; anything else from the OS is a bug or a failure of the run
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
    errno.EFBIG: "a file grew past the size this system allows", errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "not a folder (a file is in the way)", errno.EISDIR: "a folder, not a file",
    errno.EEXIST: "already exists (a file where a folder should be?)",
}
# the ones a write into an existing folder meets: the disk, the quota, permissions, the file size limit
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)


def os_error_code(e: BaseException) -> int | None:
    """The errno behind an exception: an OSError's own, or one that arrives inside another library's error
    (safetensors' Rust errors say "(os error 28)"; shutil.copytree gathers "[Errno 28]" strings into one
    shutil.Error), so a full disk is named as one whatever layer wrote the file."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(e))
    return int(found.group(1) or found.group(2)) if found else None


def environment_problem(e: BaseException) -> str | None:
    """One line for an OSError of the user's environment (full disk, no permission, read-only folder, a
    missing folder), naming the path; None for anything else."""
    if not isinstance(e, OSError) or e.errno not in ENVIRONMENT_ERRNOS:
        return None
    return f"{e.filename or '(a file this command writes)'}: {ENVIRONMENT_ERRNOS[e.errno]}"
