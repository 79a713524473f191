"""The prepared GPU check: `python -m scripts.gpu_check --out DIR` (see __main__.py)."""
