"""A minimal OAuth2 token endpoint for the load harness: answers `client_credentials` with a bearer
token valid for an hour and counts the requests, so the harness can show the backend credential was
fetched once and then served from portcullis's token cache.

    python3 token_endpoint.py CLIENT_ID CLIENT_SECRET   # prints the port, then serves on 127.0.0.1

POST /token (client_secret_basic or client_secret_post) -> {"access_token", "token_type", "expires_in"}
GET /stats -> {"token_requests": N}
"""
from __future__ import annotations

import base64
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLIENT_ID, CLIENT_SECRET = sys.argv[1], sys.argv[2]
lock = threading.Lock()
issued = 0


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet: one line per request would only be noise
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/stats":
            with lock:
                self.reply(200, {"token_requests": issued})
        else:
            self.reply(404, {"error": "not_found"})

    def do_POST(self) -> None:
        global issued
        length = int(self.headers.get("content-length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        client_id, secret = form.get("client_id", [""])[0], form.get("client_secret", [""])[0]
        auth = self.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                client_id, secret = urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(pw)
            except ValueError:
                return self.reply(400, {"error": "invalid_request"})
        if self.path != "/token" or form.get("grant_type") != ["client_credentials"]:
            return self.reply(400, {"error": "unsupported_grant_type"})
        if (client_id, secret) != (CLIENT_ID, CLIENT_SECRET):
            return self.reply(401, {"error": "invalid_client"})
        with lock:
            issued += 1
            n = issued
        self.reply(200, {"access_token": f"load-backend-token-{n}", "token_type": "Bearer", "expires_in": 3600})


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
