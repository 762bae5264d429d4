"""Write the offline quickstart data: generated abstracts (CSV) and a WordPiece tokenizer trained on them.

python scripts/make_sample_data.py --out data/sample --rows-per-label 300
"""

import argparse

from lightning_cls.data.sample_data import write_sample_dataset

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sample", help="output folder")
    parser.add_argument("--rows-per-label", type=int, default=300, help="rows for each of the ten subjects")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    csv = write_sample_dataset(args.out, args.rows_per_label, args.seed)
    print(f"wrote {csv} and {csv.parent / 'tokenizer'}")
