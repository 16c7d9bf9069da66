"""A tiny image service on the standard library that embeds linear-export.

    python examples/serve.py --port 8000
    curl -o cat.png 'http://127.0.0.1:8000/generate?class=3&seed=7'

One engine and one policy are opened at start-up and shared by every request; each request
generates one image with LineAR at a quarter of the full cache and answers with its PNG.
Without --checkpoint it serves the bundled demo model (64 px, classes 0..9).
"""

from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import linear_export as le
from linear_export.runtime.decode import png_bytes


class ImageService:
    """The model, engine, policy and decoder, opened once; `image(class, seed)` -> PNG bytes."""

    def __init__(self, checkpoint: str | None, model: str, image_size: int, policy: str):
        loaded = le.load_model(checkpoint, model=model, image_size=image_size)
        self.engine = le.open_engine(loaded)
        self.policy = le.make_policy(policy, self.engine)
        self.decoder = le.load_decoder(self.engine)
        self.sampling = le.SamplingConfig(cfg_scale=loaded.source.default_cfg_scale)
        self.lock = threading.Lock()  # one generation at a time on the shared engine

    def image(self, class_id: int, seed: int) -> bytes:
        with self.lock:
            result = le.generate(self.engine, [class_id], self.policy, self.sampling,
                                 seed=seed, decoder=self.decoder)
        return png_bytes(result.images[0])


def handler(service: ImageService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            url = urlparse(self.path)
            if url.path != "/generate":
                self.send_error(404, "GET /generate?class=ID&seed=N")
                return
            query = parse_qs(url.query)
            try:
                body = service.image(int(query.get("class", ["0"])[0]),
                                     int(query.get("seed", ["0"])[0]))
            except (ValueError, le.UserError) as error:
                self.send_error(400, str(error))
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # quiet: one line per request
            print(f"{self.address_string()} {format % args}", flush=True)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="LlamaGen c2i GPT [default: demo]")
    parser.add_argument("--model", default="GPT-B")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--policy", default="linear:1/4", help="a policy spec (bench syntax)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args()
    service = ImageService(args.checkpoint, args.model, args.image_size, args.policy)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(service))
    print(f"serving on http://127.0.0.1:{server.server_port}/generate?class=0&seed=0",
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
