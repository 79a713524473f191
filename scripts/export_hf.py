"""Export a checkpoint as a Hugging Face directory (config, safetensors, tokenizer with <|mask|>, modelling code).

uv run python -m scripts.export_hf --checkpoint weights/minimind_pretrain_state_dict.pt --out hf/minimind \
    --tokenizer-dir .

Load it with transformers (trust_remote_code runs the copied model/hf/modeling_nano_llada.py):
  AR:        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  -> generate() works
  diffusion: AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)  (or AutoModel) -> bidirectional logits
             (logits[:, j] predicts token j; for a logit-shifted model the shift is applied inside)
and with nano-llada: `model, config = load_model(out)`.
"""

from __future__ import annotations

import argparse

from model.hf.convert import export_hf
from scripts.common.cli import output_dir, run_main
from scripts.common.evaluation.loading import add_checkpoint_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p, "nano-llada checkpoint (.pt, full or _state_dict) or an official MiniMind2 .pth")
    p.add_argument(
        "--out", required=True, help="directory to write (created if missing; existing files are overwritten)"
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # Before reading the checkpoint, creating nothing: a bad --out is one line, and a failed export leaves no folder.
    output_dir(args.out, "--out")
    config = export_hf(args.checkpoint, args.out, args.tokenizer_dir, args.num_attention_heads)
    auto = next(name for name in config["auto_map"] if name.startswith("AutoModelFor"))
    shifted = " logit-shifted" if config.get("logit_shift") else ""
    print(
        f"exported{shifted} {config['kind']} model ({config['num_hidden_layers']} layers, "
        f"hidden {config['hidden_size']}, vocab {config['vocab_size']}) to {args.out}; "
        f"load with {auto}.from_pretrained('{args.out}', trust_remote_code=True)"
    )


if __name__ == "__main__":
    run_main(main)
