"""The official BIDS validator (`bids-validator-deno`, a test dependency) as a test helper.

`errors(root)` runs it on one dataset (raw or derivative; each derivative is validated as its
own dataset, with its own `.bidsignore`) and returns its errors as "CODE location" strings.
Where the validator cannot run (the package or its Deno runtime is missing for this platform),
the calling test is skipped with the reason; a validator that runs but returns something
unreadable fails the test.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

_RUN = "import sys; from bids_validator_deno import cli; sys.argv[0] = 'bids-validator'; cli()"


def _require() -> None:
    for module in ("bids_validator_deno", "deno"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the BIDS validator cannot run here: no Python package '{module}'")


def report(root) -> dict:
    """The validator's JSON report of the dataset `root` (not recursive)."""
    _require()
    env = {**os.environ, "NO_COLOR": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUN, str(root), "--format", "json"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
    except OSError as err:  # e.g. no Deno binary for this platform
        pytest.skip(f"the BIDS validator cannot run here: {err}")
    if "find_deno_bin" in proc.stderr or "No such file" in proc.stderr:
        pytest.skip(f"the BIDS validator cannot run here: {proc.stderr.strip()[-300:]}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"bids-validator on {root} exited {proc.returncode} without a JSON report:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )


def errors(root) -> list[str]:
    """Every error the validator finds in `root`, as "CODE location (subCode)" strings."""
    found = report(root)["issues"]["issues"]
    return [
        f"{i['code']} {i.get('location', '')} {i.get('subCode', '')}".strip()
        for i in found
        if i.get("severity") == "error"
    ]
