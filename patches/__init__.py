"""SGLang hook modules (importable as `sglang_kvc.patches`); plugin.py registers them."""
