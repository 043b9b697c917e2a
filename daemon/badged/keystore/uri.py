"""RFC 7512 ``pkcs11:`` URIs naming the token badged keeps its keys in.

Example::

    pkcs11:token=badged;serial=0123?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/badged/user.pin

Only ``pin-source`` is accepted for the PIN: ``pin-value`` would put the PIN
into config files, process listings and logs, so it is refused outright.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from badged.errors import ConfigError

_PATH_ATTRS = {
    "token", "manufacturer", "serial", "model", "library-manufacturer",
    "library-description", "library-version", "slot-id", "slot-description",
    "slot-manufacturer", "object", "id", "type",
}
_QUERY_ATTRS = {"module-path", "module-name", "pin-source"}


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed token URI. ``pin_source`` is a filesystem path, never a PIN."""

    path_attrs: dict[str, str]
    module_path: str | None
    pin_source: str | None

    @property
    def token_label(self) -> str | None:
        return self.path_attrs.get("token")

    @property
    def serial(self) -> str | None:
        return self.path_attrs.get("serial")

    def redacted(self) -> str:
        """Safe for logs: the URI carries no secret, but say so explicitly."""
        attrs = ";".join(f"{k}={v}" for k, v in sorted(self.path_attrs.items()))
        return f"pkcs11:{attrs}"


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse and validate; raise ConfigError with a reason on anything odd."""
    if not uri.startswith("pkcs11:"):
        raise ConfigError(f"not a pkcs11: URI: {uri[:40]!r}")
    body = uri[len("pkcs11:"):]
    path, _, query = body.partition("?")
    path_attrs: dict[str, str] = {}
    for part in filter(None, path.split(";")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"pkcs11 URI attribute without '=': {key!r}")
        if key not in _PATH_ATTRS:
            raise ConfigError(f"unknown pkcs11 URI path attribute {key!r}")
        if key in path_attrs:
            raise ConfigError(f"duplicate pkcs11 URI attribute {key!r}")
        path_attrs[key] = unquote(value)
    query_attrs: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if key == "pin-value":
            raise ConfigError(
                "pin-value is not accepted in pkcs11 URIs: put the PIN in a file "
                "(mode 0600) and name it with pin-source=file:/path"
            )
        if not sep or key not in _QUERY_ATTRS:
            raise ConfigError(f"unknown pkcs11 URI query attribute {key!r}")
        query_attrs[key] = unquote(value)
    pin_source = query_attrs.get("pin-source")
    if pin_source is not None:
        if pin_source.startswith("file:"):
            pin_source = pin_source[len("file:"):]
            if pin_source.startswith("//"):
                pin_source = pin_source[2:]
        if not pin_source.startswith("/"):
            raise ConfigError("pin-source must be an absolute file path or file: URI")
    if "token" not in path_attrs and "serial" not in path_attrs:
        raise ConfigError("pkcs11 URI must name the token (token= or serial=)")
    return Pkcs11Uri(path_attrs, query_attrs.get("module-path"), pin_source)
