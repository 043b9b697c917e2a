"""``badgectl proxy env AGENT``: what an agent's shell needs to call APIs through
badged's credential proxy (docs/proxy.md).

The proxy is not a forward proxy: an agent names the route as the host of a
plain ``http://ROUTE/path`` URL sent over the Unix socket, and badged makes
the HTTPS call with the credential attached. So nothing here sets
``HTTP_PROXY``; it exports the socket and the agent name, and prints the
one-liners for curl, httpx and requests.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from badgeclient._cli.options import emit_json, json_option
from badgeclient.proxy import proxy_socket


@click.group("proxy")
def proxy_group() -> None:
    """The credential proxy: agents call APIs, badged attaches the credential."""


@proxy_group.command("env")
@click.argument("agent")
@click.option("--proxy-socket", "proxy_socket_path", default=None,
              help="The proxy socket [env BADGED_PROXY_SOCKET; default: proxy.sock beside "
                   "the workload socket].")
@click.option("--route", default="ROUTE", show_default=True,
              help="A route name to fill into the examples.")
@json_option
def proxy_env(agent: str, proxy_socket_path: str | None, route: str, as_json: bool) -> None:
    """Print the exports (and client one-liners) for AGENT to use the proxy."""
    sock = proxy_socket_path or proxy_socket()
    exports = {"BADGED_PROXY_SOCKET": sock, "BADGED_AGENT": agent}
    if as_json:
        emit_json({"env": exports, "route_url": f"http://{route}/"})
        return
    for name, value in exports.items():
        click.echo(f"export {name}={shlex.quote(value)}")
    click.echo(f"""# No credential is exported: badged attaches it. Call http://{route}/PATH
# over the socket (the host is the route's name; badged makes the HTTPS call).
# curl:     curl --unix-socket "$BADGED_PROXY_SOCKET" -H "Badged-Agent: $BADGED_AGENT" \\
#               http://{route}/PATH
# httpx:    httpx.Client(transport=httpx.HTTPTransport(uds=os.environ["BADGED_PROXY_SOCKET"]),
#               base_url="http://{route}", headers={{"Badged-Agent": os.environ["BADGED_AGENT"]}})
# Python:   from badgeclient.proxy import httpx_client, requests_session
#           httpx_client("{route}").get("/PATH"); requests_session().get("http://{route}/PATH")""")
    if not Path(sock).exists():
        click.echo(f"# note: {sock} does not exist (is [proxy] socket set and the daemon "
                   f"running?)", err=True)
