"""A Unix-socket relay that makes swtpm as slow as a real TPM.

swtpm signs in well under a millisecond; a discrete TPM takes ~200 ms
(FINDINGS §3). This relay sits between the TCTI and swtpm and delays every
command on the data socket, so direct and session modes can be compared at
real-TPM speed with the real TCTI and swtpm behind it. The control socket
(``S.ctrl``, which the swtpm TCTI requires next to ``S``) is relayed as is.

    python tests/session/slow_tpm.py LISTEN_SOCK SWTPM_SOCK DELAY_SECONDS
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen: str, target: str, delay: float) -> asyncio.AbstractServer:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_unix_connection(target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, sw, delay), _pipe(sr, cw, 0.0))

    return await asyncio.start_unix_server(handle, path=listen)


async def main(listen: str, target: str, delay: float) -> None:
    data = await _serve(listen, target, delay)
    ctrl = await _serve(f"{listen}.ctrl", f"{target}.ctrl", 0.0)
    print("relay ready", flush=True)
    async with data, ctrl:
        await asyncio.gather(data.serve_forever(), ctrl.serve_forever())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
