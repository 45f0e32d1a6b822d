"""Search an embedded dataset: a nearest-neighbour index, a Python API, a server with a page.

  python -m clip_jax.search build --embeddings OUT --output IDX [--kind flat|ivf_pq]
  python -m clip_jax.search serve --index IDX --checkpoint CKPT [--images_root DIR] \
      --host 127.0.0.1 --port 8000

  from clip_jax.search import Index
  Index("IDX").query(text="a dog on a beach", k=10)   # or image=..., embedding=...

OUT is `python -m clip_jax.embed`'s output. The flat index is exact (faiss's IndexFlatIP,
or numpy without faiss: the same results); ivf_pq needs faiss-cpu (`pip install
clip_jax[search]`). See `index` for IDX's files and `server` for the HTTP API; the page is
page.html, package data, with no build step.

`main` is the command line (`python -m clip_jax.search`; `__main__` only calls it).
"""
from __future__ import annotations

import argparse
import json
import sys

from clip_jax.search.index import KINDS, Index, build

__all__ = ["Index", "build", "main"]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m clip_jax.search",
                                   description="Index an embedded dataset and search it.")
  commands = parser.add_subparsers(dest="command", required=True)
  build_parser = commands.add_parser("build", help="build IDX from clip_jax.embed's output")
  build_parser.add_argument("--embeddings", required=True, help="clip_jax.embed's --output_dir")
  build_parser.add_argument("--output", required=True, help="the index folder to write")
  build_parser.add_argument("--kind", choices=KINDS, default="flat",
                            help="flat: exact inner product (default); ivf_pq: faiss "
                                 "IVF + product quantisation, for large sets")
  build_parser.add_argument("--modality", choices=("image", "text"), default="image",
                            help="which embeddings to index (default image)")
  build_parser.add_argument("--nlist", type=int, default=None, help="ivf_pq: inverted lists")
  build_parser.add_argument("--pq_m", type=int, default=None, help="ivf_pq: codes per vector")
  build_parser.add_argument("--pq_bits", type=int, default=8, help="ivf_pq: bits per code")
  serve_parser = commands.add_parser("serve", help="serve IDX: a JSON API and a web page")
  serve_parser.add_argument("--index", required=True, help="the folder `build` wrote")
  serve_parser.add_argument("--checkpoint", default=None,
                            help="the model for text and image queries (default: the one "
                                 "that made the embeddings)")
  serve_parser.add_argument("--images_root", default=None,
                            help="where the dataset's images are now, if not where they were "
                                 "embedded (paths under the old root are kept)")
  serve_parser.add_argument("--host", default="127.0.0.1")
  serve_parser.add_argument("--port", type=int, default=8000, help="0: any free port")
  serve_parser.add_argument("--nprobe", type=int, default=16, help="ivf_pq: lists visited")
  return parser


def main(argv=None) -> int:
  """The command line, `python -m clip_jax.search build|serve` (run by __main__.py)."""
  args = _parser().parse_args(argv)
  try:
    if args.command == "build":
      print(json.dumps(build(args.embeddings, args.output, kind=args.kind,
                             modality=args.modality, nlist=args.nlist, pq_m=args.pq_m,
                             pq_bits=args.pq_bits)))
    else:
      from clip_jax.search import server  # pylint: disable=g-import-not-at-top
      server.serve(args.index, checkpoint=args.checkpoint, images_root=args.images_root,
                   host=args.host, port=args.port, nprobe=args.nprobe)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  return 0
