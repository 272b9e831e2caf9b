"""The run's outcome for machines (``report.json``) and for people (``report.md``, PNG plots),
the environment a report was measured in, and the comparison of two reports.

Torch-free on purpose: the report stage also runs on device machines (docs/architecture.md
section 1). The package itself imports nothing, so ``xpdeploy compare`` starts without numpy or
matplotlib; import the submodules (``schema``, ``markdown``, ``plots``, ``environment``,
``compare``).
"""
