"""Markdown only: every task's dataclass of numbers to lines and targets, and the results page.

Nothing here measures: ``markdown`` has the table, number and verdict helpers; one module per task
(``top_eigenvalue``, ``blocks``, ``spectra`` for tasks 3 and 4, ``costs`` for tasks 5 to 7) turns that
task's result into ``(lines, targets)``; ``page`` writes the header, the targets table and the caveats.
"""
