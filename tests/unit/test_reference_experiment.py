"""The committed reference experiment (docs/reference-experiment) checks out: every evaluation in its
metrics.json recounts from its episodes, every episode replays in a fresh environment, and its
report.md is what the report code renders from metrics.json (a change to the report's code or the
environments that breaks this means regenerating the docs, not editing them)."""

import shutil
import tarfile
from pathlib import Path

from agent.audit import audit_experiment

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference-experiment"


def test_the_committed_reference_experiment_checks_out(tmp_path):
    with tarfile.open(REFERENCE / "units.tar.xz") as archive:
        archive.extractall(tmp_path, filter="data")
    for name in ("metrics.json", "report.md"):
        shutil.copy(REFERENCE / name, tmp_path / name)
    audit = audit_experiment(tmp_path)
    assert audit.problems == []
    assert (audit.cells, audit.episodes, audit.report_checked) == (224, 22400, True)


def test_the_committed_second_experiment_checks_out(tmp_path):
    """docs/stream2-experiment (issue 23): six arms, grpo and routed among them, the routing shares recounted."""
    stream2 = REFERENCE.parent / "stream2-experiment"
    with tarfile.open(stream2 / "units.tar.xz") as archive:
        archive.extractall(tmp_path, filter="data")
    for name in ("metrics.json", "report.md"):
        shutil.copy(stream2 / name, tmp_path / name)
    audit = audit_experiment(tmp_path)
    assert audit.problems == []
    assert (audit.cells, audit.episodes, audit.report_checked) == (224, 22400, True)
