"""`mtmim report`: Markdown plus PNG figures from training runs and evaluation results.

Inputs are folders, recognised by what they hold:
- a training run (`metrics.csv`, `config.json`, `model.pt` from the training loop): its
  curves (losses, accuracy, lr, and every metric the objective logs), and for fine-tuning
  the CLUB estimate over training (the paper's Figure 6 analogue);
- an evaluation (`results.json`, `results.md`, `results.cmc.csv`, `results.roc.csv` from
  `mtmim evaluate`, each named after its --out stem; a folder holding several stems is
  named by one's .json): its tables, CMC and ROC curves; and, when it was run with
  `--features`, its `results.features.npz`: the x_id and x_age of the scored faces under
  each fine-tuned model, projected to 2-D (PCA) and scored for disentanglement.
The report only reads these files: it runs no model and opens no cache. results.json is the
manifest (`eval.output_set`): only the files it lists, with their sha256 unchanged, are
attached, and each other one is named on one line. Tables and curves that cannot be
attached (a changed file, a results.json from before manifests) are redrawn from
results.json itself; features are not.

Modules: `loading` (the input folders), `figures` (training curves, CLUB, CMC, ROC, and the
helpers every figure uses), `projection` (the x_id / x_age faces: thinning, disentanglement
scores, PCA figure), `age` (rank-1 by age, the probe-age x gallery-age map) and `page` (the
tables and the assembly of report.md). Every figure is written atomically; the plotting
functions return the matplotlib Figure so tests can check that what is drawn is what the
files say.
"""

from mtmim_cli.report.page import build_report

__all__ = ["build_report"]
