"""The converter's command line: `python -m clip_jax.convert --help` (see clip_jax.convert)."""
from __future__ import annotations

import argparse
import sys

from clip_jax.convert import SOURCES, convert
from clip_jax.models import MODEL_CONFIGS, OPEN_CLIP_NAMES


def _print_note(note: str) -> None:
  print(f"note: {note}", file=sys.stderr)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.convert",
      description="Convert OpenAI / open_clip / Hugging Face CLIP weights to clip_jax.")
  parser.add_argument("--source", required=True, choices=SOURCES)
  parser.add_argument("--input", required=True,
                      help=".pt/.pth/.bin/.safetensors file, TorchScript archive, sharded "
                           "checkpoint index (*.index.json), or HF model dir")
  parser.add_argument("--output", required=True, help="checkpoint dir to create")
  parser.add_argument("--model", choices=sorted(MODEL_CONFIGS) + list(OPEN_CLIP_NAMES),
                      metavar="NAME",
                      help="variant to check against (default: inferred from the shapes): one of "
                           f"{', '.join(sorted(MODEL_CONFIGS))}, or an open_clip name, which sets "
                           f"the activation too: {', '.join(OPEN_CLIP_NAMES)}")
  parser.add_argument("--act", choices=("quick_gelu", "gelu"),
                      help="activation (default: what an open_clip --model name or a config file "
                           "beside --input says, else quick_gelu for openai/hf and gelu for "
                           "open_clip)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = parser.parse_args(argv)
  try:
    config = convert(args.input, args.output, source=args.source, model=args.model, act=args.act,
                     overwrite=args.overwrite, notify=_print_note)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(f"wrote {args.output}: model {config.name!r}, act {config.act}, "
        f"image {config.vision.image_size}px, embed {config.embed_dim}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
