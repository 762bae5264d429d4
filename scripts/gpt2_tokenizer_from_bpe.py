"""Build a Hugging Face GPT-2 tokenizer folder from GPT-2's raw BPE files (encoder.json = vocab.json,
vocab.bpe = merges.txt), for machines without the hub.

    python scripts/gpt2_tokenizer_from_bpe.py --bpe-dir ../shared/data/gpt2_bpe --out data/gpt2_tokenizer
    python -m lightning_cls fit --config configs/gpt2.yaml --data.tokenizer data/gpt2_tokenizer ...
"""

import argparse
from pathlib import Path

from transformers import GPT2TokenizerFast

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bpe-dir", required=True, type=Path, help="folder with encoder.json and vocab.bpe")
    parser.add_argument("--out", required=True, type=Path, help="output tokenizer folder")
    args = parser.parse_args()
    tokenizer = GPT2TokenizerFast(
        vocab=str(args.bpe_dir / "encoder.json"), merges=str(args.bpe_dir / "vocab.bpe"), model_max_length=1024
    )
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({len(tokenizer)} tokens; end of text = {tokenizer.eos_token_id})")
