"""Multi-seed studies: the methods x seeds harness and its Table-1-style report, and error profiles of the
answers (``mdm-scale experiment run | errors``, docs/results.md)."""
