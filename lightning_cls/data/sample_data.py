"""Generated scientific-looking texts and small tokenizers, so that quickstart and tests need no download.

The texts are synthetic: each subject has its own keywords mixed into shared filler words, so a small model can
learn the task in a minute while it stays far from trivial for a few steps of training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_cls.data.labels import DEFAULT_LABELS

KEYWORDS = {
    "astrophysics": "galaxy stellar redshift cosmic supernova luminosity telescope dark halo accretion exoplanet",
    "computer science": "algorithm neural network graph compiler runtime dataset learning benchmark software protocol",
    "condensed matter": "lattice phonon superconducting magnetic spin crystal topological insulator fermi band",
    "electrical engineering and systems science": "signal circuit control antenna wireless power grid sensor filter "
    "channel modulation",
    "high energy physics phenomenology": "collider higgs neutrino hadron quark lhc cross section decay boson "
    "parton gluon",
    "high energy physics theory": "string gauge holographic supersymmetry brane duality conformal anomaly "
    "moduli instanton",
    "mathematics": "theorem lemma manifold prove algebra conjecture polynomial topology group invariant",
    "physics": "optics laser fluid plasma acoustic turbulence photon experiment wave instrument",
    "quantum physics": "qubit entanglement quantum circuit decoherence photonic teleportation measurement "
    "superposition",
    "statistics": "regression estimator bayesian inference variance sampling likelihood posterior bootstrap covariate",
}
RARE_LABELS = ("nuclear theory", "economics")
FILLER = (
    "we study the of a and in to show that this model results paper new method based on using data analysis "
    "propose approach present find these our which from with is are by for can be two large small high low first "
    "order effects properties observed obtained framework results significant different theory general case"
).split()


def generate_texts(rows_per_label: int, seed: int = 0, rare_rows: int = 3) -> tuple[list[str], list[str]]:
    """Texts and label names: ``rows_per_label`` for each of the ten subjects, ``rare_rows`` for two rare ones."""
    rng = np.random.default_rng(seed)
    labels = [label for label in DEFAULT_LABELS for _ in range(rows_per_label)]
    labels += [label for label in RARE_LABELS for _ in range(rare_rows)]
    rng.shuffle(labels)
    all_keywords = [w for words in KEYWORDS.values() for w in words.split()]
    texts = []
    for label in labels:
        own = KEYWORDS.get(label, "nucleus market").split()
        n = int(rng.integers(20, 90))
        # Mostly filler, some own keywords, some keywords of other subjects as noise.
        kinds = rng.choice(3, size=n, p=[0.72, 0.18, 0.10])
        words = [
            FILLER[rng.integers(len(FILLER))]
            if k == 0
            else own[rng.integers(len(own))]
            if k == 1
            else all_keywords[rng.integers(len(all_keywords))]
            for k in kinds
        ]
        texts.append(" ".join(words).capitalize() + ".")
    return texts, labels


def train_wordpiece_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """An uncased BERT-style WordPiece tokenizer ([CLS] text [SEP]), saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def train_bpe_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """A GPT-2-style byte-level BPE tokenizer with `<|endoftext|>` and, like GPT-2, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def write_sample_dataset(out_dir: str | Path, rows_per_label: int = 300, seed: int = 0) -> Path:
    """Write ``abstracts.csv`` (columns text, label) and a ``tokenizer/`` folder trained on it; returns the CSV."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts, labels = generate_texts(rows_per_label, seed)
    csv = out_dir / "abstracts.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(csv, index=False)
    train_wordpiece_tokenizer(texts, out_dir / "tokenizer")
    return csv
