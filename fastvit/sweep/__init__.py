"""Sweeps over budgets and variants (`fastvit-sweep`) and BNSL forecasts of bigger budgets
(`fastvit-forecast`): variants.py (named config overrides), runner.py (resumable fastvit-train runs),
report.py (CSV, Markdown, plots, forecasts), bnsl.py (the fit, pure numpy/scipy)."""
