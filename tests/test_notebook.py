"""examples/ptq_vs_qat.ipynb runs end to end in a real Jupyter kernel (short setting)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_ptq_vs_qat_notebook_executes(monkeypatch):
    monkeypatch.setenv("JQUANT_NOTEBOOK", "short")
    nb = nbformat.read(EXAMPLES / "ptq_vs_qat.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()  # fmt: skip
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "of RTN's loss recovered" in text and "trainable parameters" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot
    assert os.environ["JQUANT_NOTEBOOK"] == "short"
