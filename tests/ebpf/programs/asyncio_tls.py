"""asyncio TLS client and server in one process: SSLObject over memory BIOs, the
path aiohttp, httpx (async) and uvicorn take.  Ground truth for test_membio.py.

    asyncio_tls.py pair CERT KEY
        connect, then a few request/response rounds of random bytes; print one
        JSON line (see below).
    asyncio_tls.py wait CERT KEY
        connect and do one round, print {"port", "client_port"} and wait for a
        line on stdin (start the agent meanwhile), then the rounds; print the
        JSON line, covering only what was sent after the line.

JSON: {"pid", "port", "client_port", "client_sent_sha256", "server_sent_sha256",
"client_sent_len", "server_sent_len"}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import sys

# (request size, response size) per round: small, a few records, many records.
ROUNDS = ((37, 1200), (5000, 80), (150_000, 70_000))


async def main(mode: str, cert: str, key: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    server_sent = bytearray()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readexactly(8)
            except asyncio.IncompleteReadError:
                writer.close()  # the client is done
                return
            want, answer = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
            await reader.readexactly(want)
            body = os.urandom(answer)
            server_sent.extend(body)
            writer.write(body)
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
    client_port = writer.get_extra_info("sockname")[1]
    client_sent = bytearray()

    async def round_trip(req: int, resp: int) -> None:
        payload = req.to_bytes(4, "big") + resp.to_bytes(4, "big") + os.urandom(req)
        client_sent.extend(payload)
        writer.write(payload)
        await writer.drain()
        await reader.readexactly(resp)

    if mode == "wait":
        await round_trip(10, 10)
        print(json.dumps({"port": port, "client_port": client_port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        client_sent.clear()
        server_sent.clear()
    for req, resp in ROUNDS:
        await round_trip(req, resp)
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    print(json.dumps({
        "pid": os.getpid(), "port": port, "client_port": client_port,
        "client_sent_sha256": hashlib.sha256(client_sent).hexdigest(),
        "server_sent_sha256": hashlib.sha256(server_sent).hexdigest(),
        "client_sent_len": len(client_sent), "server_sent_len": len(server_sent),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
