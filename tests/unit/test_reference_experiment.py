"""The committed reference experiments (docs/reference-experiment, docs/stream2-experiment) check out:
every evaluation in its metrics.json recounts from its episodes, every episode replays in a fresh environment, and its
report.md is what the report code renders from metrics.json (a change to the report's code or the
environments that breaks this means regenerating the docs, not editing them)."""

import shutil
import tarfile
from pathlib import Path

import pytest

from agent.audit import audit_experiment

DOCS = Path(__file__).resolve().parents[2] / "docs"


# the first reference stream (issue 5), and the second (issue 23: six arms, grpo and routed among them, the routed
# arm's shares recounted from its episodes' adapters)
@pytest.mark.parametrize("name", ["reference-experiment", "stream2-experiment"])
def test_the_committed_experiment_checks_out(name, tmp_path):
    committed = DOCS / name
    with tarfile.open(committed / "units.tar.xz") as archive:
        archive.extractall(tmp_path, filter="data")
    for file in ("metrics.json", "report.md"):
        shutil.copy(committed / file, tmp_path / file)
    audit = audit_experiment(tmp_path)
    assert audit.problems == []
    assert (audit.cells, audit.episodes, audit.report_checked) == (224, 22400, True)
