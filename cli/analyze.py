"""``depict-analyze``: look inside a trained decoder. Each command lives in its own module under cli/."""

from __future__ import annotations

from depict_analysis.cli.ablate import ablate
from depict_analysis.cli.attention import attention
from depict_analysis.cli.class_rates import class_rates
from depict_analysis.cli.coding_rate import coding_rate
from depict_analysis.cli.common import new_app
from depict_analysis.cli.demo import demo, report
from depict_analysis.cli.orthogonality import orthogonality
from depict_analysis.cli.pca_seg import pca_seg
from depict_analysis.cli.robustness import robustness

app = new_app("Analyses of DEPICT / Segmenter decoders: every command writes a figure (PNG, PDF) and its numbers (JSON, CSV).")

app.command("coding-rate")(coding_rate)
app.command("pca-seg")(pca_seg)
app.command("orthogonality")(orthogonality)
app.command("robustness")(robustness)
app.command("class-rates")(class_rates)
app.command("attention")(attention)
app.command("ablate")(ablate)
app.command("demo")(demo)
app.command("report")(report)

if __name__ == "__main__":
    app()
