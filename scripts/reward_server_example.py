#!/usr/bin/env python3
"""A reward server for pso in plain Python: protocol v1 of docs/reward-protocol.md.

The reward here is a toy, the mean "redness" of the image (R minus the mean of G and B, over 255,
averaged over pixels), so the script runs anywhere with numpy and Pillow. Replace `score_batch`
with a real model — ImageReward, HPSv2, a VLM judge — and keep the rest: pso's client then uses it
exactly like `pso reward serve`.

Usage:
    python scripts/reward_server_example.py [--host 127.0.0.1] [--port 8787] [--max-batch 16]
                                            [--token-file FILE]
Then: pso score --scorer http --model http://127.0.0.1:8787 --prompt "a red apple" img.png

With --port 0 a free port is chosen; the first line on stdout is always `listening on URL`.
"""
import argparse
import base64
import binascii
import hmac
import io
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

PROTOCOL = 1
MAX_BODY_BYTES = 64 << 20
MAX_IMAGE_BYTES = 16 << 20
SCORER = {"name": "redness", "version": "example-1", "higher_is_better": True}


def score_batch(prompts, images):
    """One float per (prompt, PIL RGB image). Plug a real reward model in here, e.g.:

    ImageReward:  model = ImageReward.load("ImageReward-v1.0")  (once, at start-up)
                  return [model.score(p, im) for p, im in zip(prompts, images)]
    HPSv2:        return [hpsv2.score(im, p)[0] for p, im in zip(prompts, images)]
    A VLM judge:  ask "Rate 1-10 how well this image matches: {prompt}" and parse the number;
                  return a float for every item, never None (pso rejects the whole batch).
    """
    scores = []
    for image in images:
        rgb = np.asarray(image, dtype=np.float64)
        redness = rgb[..., 0] - (rgb[..., 1] + rgb[..., 2]) / 2.0
        scores.append(float(redness.mean() / 255.0))
    return scores


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    token = None
    max_batch = 16

    def reply(self, status, body):
        # allow_nan=False: a NaN must be an error here, not an invalid JSON token on the wire.
        data = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if status >= 400:
            # The request body may be unread: close rather than parse it as the next request.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def authorized(self):
        if self.token is None:
            return True
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            self.reply(401, {"error": "missing bearer token: send `Authorization: Bearer <token>`"})
            return False
        if not hmac.compare_digest(given[len("Bearer "):].strip().encode(), self.token.encode()):
            self.reply(401, {"error": "wrong bearer token"})
            return False
        return True

    def do_GET(self):
        if not self.authorized():
            return
        if self.path != "/v1/health":
            return self.reply(404, {"error": "no such endpoint; protocol v1 has GET /v1/health and POST /v1/score"})
        self.reply(200, dict(SCORER, max_batch=self.max_batch, protocol=PROTOCOL))

    def do_POST(self):
        if not self.authorized():
            return
        if self.path != "/v1/score":
            return self.reply(404, {"error": "no such endpoint; protocol v1 has GET /v1/health and POST /v1/score"})
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self.reply(413, {"error": f"request body exceeds the server's limit of {MAX_BODY_BYTES} bytes"})
        try:
            items = json.loads(self.rfile.read(length))["items"]
        except (ValueError, KeyError, TypeError) as e:
            return self.reply(400, {"error": f"the body is not a protocol v1 score request: {e}"})
        if len(items) > self.max_batch:
            return self.reply(413, {"error": f"{len(items)} items exceed the server's max_batch of {self.max_batch}"})
        prompts, images = [], []
        for index, item in enumerate(items):
            try:
                data = base64.b64decode(item["image"] + "=" * (-len(item["image"]) % 4), validate=True)
            except (binascii.Error, KeyError, TypeError) as e:
                return self.reply(400, {"error": f"item {index}: image is not valid base64: {e}"})
            if len(data) > MAX_IMAGE_BYTES:
                return self.reply(413, {"error": f"item {index}: image exceeds the per-image limit of {MAX_IMAGE_BYTES} bytes"})
            try:
                image = Image.open(io.BytesIO(data))
                if image.format not in ("PNG", "JPEG"):
                    raise ValueError(f"{image.format} images are not accepted")
                images.append(image.convert("RGB"))
            except Exception as e:  # PIL raises many types for corrupt data
                return self.reply(400, {"error": f"item {index}: cannot decode the image (PNG or JPEG expected): {e}"})
            prompts.append(str(item.get("prompt", "")))
        try:
            scores = score_batch(prompts, images)
            body = {"scores": scores, "scorer": SCORER}
            json.dumps(body, allow_nan=False)  # fails on NaN / inf: answer 500, not a bad score
        except Exception as e:
            return self.reply(500, {"error": f"scorer failed: {e}"})
        if len(scores) != len(items):
            return self.reply(500, {"error": f"scorer returned {len(scores)} scores for {len(items)} items"})
        self.reply(200, body)

    def log_message(self, fmt, *args):
        sys.stderr.write("reward_server_example: " + fmt % args + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--token-file")
    args = parser.parse_args()
    Handler.max_batch = args.max_batch
    if args.token_file:
        Handler.token = open(args.token_file).read().strip()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
