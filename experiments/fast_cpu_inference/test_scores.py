"""Each variant's macro-F1 on the test split, as export measures it on the validation split.

python experiments/fast_cpu_inference/test_scores.py EXPORT_DIR 2000
"""

import json
import sys
import time

from lightning_cls.export.exporter import label_ids, split_sample
from lightning_cls.export.folder import read_export_metadata
from lightning_cls.export.runtime import measure_variants
from lightning_cls.model.checkpoints import load_checkpoint

d = sys.argv[1]
meta = read_export_metadata(d)
texts, names, source = split_sample(load_checkpoint(meta.checkpoint, mmap=True), "test", int(sys.argv[2]))
ids, why = label_ids(names, meta.labels)
start = time.time()
records = measure_variants(d, texts, source, variants=["fp32", "onnx_fp32", "onnx_int8"], labels=ids)
for name, r in records.items():
    print(
        f"{name:10s} macro-F1 {r['macro_f1']:.4f} accuracy {r['accuracy']:.4f} same labels {r['agreement']:.2%} "
        f"changed {r['changed']} (now right {r['now_right']}, now wrong {r['now_wrong']}) {r['texts_per_s']} texts/s"
    )
print(json.dumps(records, indent=1))
print(f"{time.time() - start:.0f} s")
