"""Regenerates zeroshot_prompts.json from openai/CLIP's data/prompts.md.

  python -m clip_jax.assets.make_zeroshot_prompts PATH/TO/prompts.md [OUT.json]

Each `## Heading` section of prompts.md holds a ```bash block with two Python list
literals, `classes` and `templates`; they are read with `ast.literal_eval` (no code runs).
"""
import ast
import json
import pathlib
import re
import sys

_SECTION = re.compile(r"^## (.+?)\s*$\n(.*?)(?=^## |\Z)", re.MULTILINE | re.DOTALL)
_CODE_BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def parse_prompts_md(text: str) -> dict:
  """Returns {lowercased heading: {"name", "classes", "templates"}} in file order."""
  datasets = {}
  for heading, body in _SECTION.findall(text):
    block = _CODE_BLOCK.search(body)
    if block is None:
      raise ValueError(f"prompts.md section {heading!r} has no ```bash block")
    lists = {}
    for node in ast.parse(block.group(1)).body:
      single_name = isinstance(node, ast.Assign) and len(node.targets) == 1
      if not (single_name and isinstance(node.targets[0], ast.Name)):
        raise ValueError(f"prompts.md section {heading!r}: expected `name = [...]` assignments only")
      lists[node.targets[0].id] = ast.literal_eval(node.value)
    if set(lists) != {"classes", "templates"}:
      raise ValueError(f"prompts.md section {heading!r} defines {sorted(lists)}, "
                       "expected classes and templates")
    datasets[heading.lower()] = {
        "name": heading, "classes": lists["classes"], "templates": lists["templates"]}
  return datasets


def main(argv):
  if len(argv) not in (2, 3):
    raise SystemExit(__doc__)
  default_out = pathlib.Path(__file__).with_name("zeroshot_prompts.json")
  out = pathlib.Path(argv[2]) if len(argv) == 3 else default_out
  datasets = parse_prompts_md(pathlib.Path(argv[1]).read_text(encoding="utf-8"))
  out.write_text(json.dumps(datasets, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  print(f"wrote {len(datasets)} datasets to {out}")


if __name__ == "__main__":
  main(sys.argv)
