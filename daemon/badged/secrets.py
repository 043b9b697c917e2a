"""Secret values that cannot leak through ``repr``, ``str`` or logging."""

from __future__ import annotations

import os
import stat

from badged.errors import ConfigError


class Secret:
    """Holds a PIN or passphrase; prints as ``Secret(***)``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The only way to get the value: greppable, so every use is reviewed."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def read_secret_file(path: str) -> Secret:
    """Read a PIN file, refusing one that others can read or write.

    A PIN file readable by group/other would hand the token to every local
    user, which is exactly what badged exists to prevent.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError("PIN file not found", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot open PIN file: {exc.strerror}", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("PIN file is not a regular file", path=path)
        if st.st_mode & 0o077:
            raise ConfigError(
                f"PIN file mode {stat.S_IMODE(st.st_mode):04o} is too open; use 0600", path=path
            )
        if st.st_uid != os.geteuid():
            raise ConfigError("PIN file is not owned by the daemon's user", path=path)
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    value = data.decode("utf-8", errors="strict").rstrip("\r\n")
    if not value:
        raise ConfigError("PIN file is empty", path=path)
    return Secret(value)
