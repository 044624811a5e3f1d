#!/usr/bin/env python3
"""A WAN on loopback: a TCP proxy that delays every chunk by a fixed one-way delay in each
direction (a delay line: chunks in flight are not held back by one another), with an
optional rate cap per direction (0: none). The kernel's netem is not available in
containers. With CUT_S, each connection is reset (RST both ways) CUT_S seconds after it
was accepted: a link that keeps dropping.

    delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS [RATE_MB_PER_S [CUT_S]]

Prints "listening on PORT" once it accepts connections (port 0 picks one).
"""
import asyncio
import socket
import struct
import sys
import time


# Bytes a direction holds in its delay line before it stops reading: far above any
# bandwidth-delay product measured here (1 GB/s x 25 ms = 25 MB), so the line, not this
# bound, limits what is in flight. (A bound in chunks would penalise a sender whose writes
# arrive as many small reads, as HTTP/2 frames do.)
MAX_QUEUED = 128 << 20


async def pump(reader, writer, delay, rate):
    loop = asyncio.get_running_loop()
    # Each chunk is written `delay` after it was read; a rate cap spaces the chunks out.
    queue = asyncio.Queue()
    queued = [0]
    room = asyncio.Event()
    room.set()
    dead = [False]

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                # The far side went away: stop reading too, rather than wait for room.
                dead[0] = True
                room.set()
                break
            queued[0] -= len(data)
            if queued[0] < MAX_QUEUED:
                room.set()
        try:
            writer.close()
        except Exception:
            pass

    task = asyncio.create_task(deliver())
    try:
        await read_into(reader, queue, queued, room, dead, delay, rate, loop)
    except asyncio.CancelledError:
        # A reset (CUT_S) cancels this pump: its delivery goes too.
        task.cancel()
        raise
    queue.put_nowait((0, None))
    await task


async def read_into(reader, queue, queued, room, dead, delay, rate, loop):
    free_at = 0.0
    try:
        while True:
            await room.wait()
            if dead[0]:
                break
            data = await reader.read(1 << 20)
            if not data:
                break
            now = loop.time()
            if rate:
                free_at = max(free_at, now) + len(data) / rate
                due = free_at + delay
            else:
                due = now + delay
            queued[0] += len(data)
            if queued[0] >= MAX_QUEUED:
                room.clear()
            queue.put_nowait((due, data))
    except (ConnectionError, OSError):
        pass


async def main():
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    rate = float(sys.argv[4]) * 1e6 if len(sys.argv) > 4 else 0.0
    cut = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    delay = delay_ms / 1000

    def reset(writer):
        sock = writer.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        writer.transport.abort()

    async def handle(c_reader, c_writer):
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            c_writer.close()
            return
        both = asyncio.gather(
            pump(c_reader, s_writer, delay, rate), pump(s_reader, c_writer, delay, rate)
        )
        try:
            await asyncio.wait_for(both, cut or None)
        except asyncio.TimeoutError:
            reset(c_writer)
            reset(s_writer)

    server = await asyncio.start_server(handle, "127.0.0.1", listen, limit=1 << 22)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
