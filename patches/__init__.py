"""SGLang hook modules, importable as `sglang_kvc.patches`; plugin.py registers them."""

if __name__ != "sglang_kvc.patches":
    # Found as a top-level `patches` because the repository root is on sys.path.
    from sglang_kvc.shadowing import yield_name

    yield_name(__name__, __file__)
