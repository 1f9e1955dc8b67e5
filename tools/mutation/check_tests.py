"""Run named test functions against mutmut's mutants in one process, faster than ``mutmut run`` when a mutant's
covering tests are slow but one fast test decides it. Needs the ``mutants/`` directory of an earlier
``bash tools/mutation/run.sh`` (mutmut switches the mutant per call through ``MUTANT_UNDER_TEST``).

Usage: python tools/mutation/check_tests.py TEST_MODULE:TEST[,TEST...] MUTANT_NAME...
e.g.   python tools/mutation/check_tests.py test_objective:test_keyed_noise_equals_the_integer_reference_hash \\
           $(mutmut results | grep 'noise.*survived' | cut -d: -f1)
Prints one line per mutant: killed (by which test, with the exception) or survived. Only tests without
fixtures or parameters can be named.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def main(spec: str, mutants: list[str]) -> None:
    os.chdir(ROOT / "mutants")
    sys.path[:0] = [str(ROOT / "mutants"), str(ROOT / "tests")]  # the mutated package, the current tests
    module, names = spec.split(":")
    tests = [getattr(importlib.import_module(module), name) for name in names.split(",")]
    for mutant in mutants:
        os.environ["MUTANT_UNDER_TEST"] = mutant
        verdict = "survived"
        for test in tests:
            try:
                test()
            except (Exception, pytest.fail.Exception) as error:  # any failure kills the mutant, as in pytest
                verdict = f"killed by {test.__name__} ({type(error).__name__})"
                break
        print(f"{mutant}: {verdict}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
