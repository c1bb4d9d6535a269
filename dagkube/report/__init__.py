"""``dagkube report``: one self-contained HTML file (Plotly, its JavaScript embedded, so it
opens offline) built from the run history in Redis. It answers the questions the seed notes
ask: do the planners save resources and at what makespan cost, do the optimizations help, how
accurate are the predictions over time, what do stricter SLAs buy, how does one run spend its
time.

Three layers, each using only those before it: :mod:`~dagkube.report.numbers` computes from
the history records (pure, no HTML, no plotting); :mod:`~dagkube.report.figures` (across runs)
and :mod:`~dagkube.report.run_detail` (one run) turn the numbers into Plotly charts with their
text; :mod:`~dagkube.report.page` assembles the HTML page and escapes what goes in it.
"""

from dagkube.report.numbers import charged_gb_s, mib_text
from dagkube.report.page import SECTIONS, load_histories, render, script_json

__all__ = ["SECTIONS", "charged_gb_s", "load_histories", "mib_text", "render", "script_json"]
