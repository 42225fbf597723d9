"""``depict-analyze``: look inside a trained decoder. Each command lives in its own module under cli/."""

from __future__ import annotations

from cli.common import new_app

app = new_app("Analyses of DEPICT / Segmenter decoders: every command writes a figure (PNG, PDF) and its numbers (JSON, CSV).")


if __name__ == "__main__":
    app()
