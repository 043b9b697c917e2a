"""A Unix-socket relay that makes swtpm as slow as a real TPM.

swtpm signs in well under a millisecond; a discrete TPM takes ~200 ms
(FINDINGS §3). This relay sits between the TCTI and swtpm and delays every
command on the data socket, so direct and session modes can be compared at
real-TPM speed with the real TCTI and swtpm behind it. The control socket
(``S.ctrl``, which the swtpm TCTI requires next to ``S``) is relayed as is.

    python tests/session/slow_tpm.py LISTEN_SOCK SWTPM_SOCK DELAY_SECONDS|@DELAY_FILE

``@FILE`` reads the delay from FILE before every command, so a test can run
set-up at full speed and then slow the TPM down.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

Delay = float | str  # seconds, or "@path" of a file holding them


def _seconds(delay: Delay) -> float:
    if isinstance(delay, float):
        return delay
    try:
        with open(delay[1:]) as fh:
            return float(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    try:
        while data := await reader.read(65536):
            if seconds := _seconds(delay):
                await asyncio.sleep(seconds)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen: str, target: str, delay: Delay) -> asyncio.AbstractServer:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_unix_connection(target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, sw, delay), _pipe(sr, cw, 0.0))

    return await asyncio.start_unix_server(handle, path=listen)


async def main(listen: str, target: str, delay: Delay) -> None:
    data = await _serve(listen, target, delay)
    ctrl = await _serve(f"{listen}.ctrl", f"{target}.ctrl", 0.0)
    print("relay ready", flush=True)
    async with data, ctrl:
        await asyncio.gather(data.serve_forever(), ctrl.serve_forever())


if __name__ == "__main__":
    arg = sys.argv[3]
    asyncio.run(main(sys.argv[1], sys.argv[2], arg if arg.startswith("@") else float(arg)))
