"""The exported folder: its format (`folder`), writing it (`exporter`, `onnx_optimize`, `model_card`), running it
(`runtime`: backends and precisions) and answering texts with it (`answer`: the one answer path)."""
