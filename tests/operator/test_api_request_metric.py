"""kubelora_api_requests_total counts requests to the API server only, not the same libraries' other traffic."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, http.server, threading
    import aiohttp, urllib3
    from kubelora.operator import metrics

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
        def log_message(self, *a):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    api, other = (s.server_address[1] for s in servers)
    metrics.instrument_api_clients(("127.0.0.1", api))
    pool = urllib3.PoolManager()
    for port in (api, api, other):
        pool.request("GET", f"http://127.0.0.1:{port}/")  # the kubernetes client; S3 through minio

    async def kopf_and_agents():
        async with aiohttp.ClientSession() as session:
            for port in (api, other, other):  # kopf's watch; the vLLM pods' agents
                async with session.get(f"http://127.0.0.1:{port}/") as r:
                    await r.read()

    asyncio.run(kopf_and_agents())
    for client in ("kubernetes", "kopf"):
        print(client, metrics.API_REQUESTS.labels(client=client, method="GET")._value.get())
    """
)


def test_only_requests_to_the_api_server_are_counted():
    # A process of its own: the counting patches urllib3 and aiohttp for the whole process.
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = dict(line.split() for line in out.stdout.splitlines())
    assert counts == {"kubernetes": "2.0", "kopf": "1.0"}, out.stdout
