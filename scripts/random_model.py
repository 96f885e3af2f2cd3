"""An HF folder with random weights shaped like a model, for benchmarks on a machine that
lacks the model's file (a GPU box with no network, say).

    python scripts/random_model.py --like smollm2-135m-instruct --out shape/ --no-weights
    python scripts/random_model.py --like shape/ --out /tmp/random-smollm2

`--like` takes a registered name, a checkpoint path, or a folder holding config.json (and
tokenizer files); `--no-weights` writes only config.json, generation_config.json and the
tokenizer (a few MB), to carry elsewhere. Without it the weights are written too, as
transformers' LlamaForCausalLM initialises them, in float32 safetensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def write_shape(like: str, out: Path) -> None:
    """config.json, generation_config.json and tokenizer files of `like` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(like)
    if (folder / "config.json").is_file():
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (folder / name).is_file() and folder.resolve() != out.resolve():
                shutil.copy(folder / name, out / name)
        return
    from checkpoints import registry

    ckpt = registry.resolve(like).open()
    (out / "config.json").write_text(json.dumps(ckpt.config, indent=1))
    if ckpt.generation_config:
        (out / "generation_config.json").write_text(json.dumps(ckpt.generation_config))
    ckpt.save_tokenizer(out)


def write_weights(out: Path, seed: int) -> None:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--like", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-weights", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_shape(args.like, args.out)
    if not args.no_weights:
        write_weights(args.out, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
