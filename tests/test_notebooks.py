"""Every notebooks/*.ipynb runs top to bottom without a cell error (a new notebook is picked up
by dropping it in). The kernel is this interpreter (sys.executable) with this environment, so it
sees the same gru_tpu as the tests; cells run with notebooks/ as the working directory.

  python tests/test_notebooks.py notebooks/quickstart.ipynb   # execute and save the outputs
"""

import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path):
  import nbformat
  from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  class ThisInterpreter(KernelSpecManager):
    def get_kernel_spec(self, kernel_name):
      return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                              "{connection_file}"], display_name="Python 3", language="python",
                        name=kernel_name)

  nb = nbformat.read(path, as_version=4)
  km = KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())
  # cleanup_kc: nbclient shuts down only a kernel whose manager it made itself; given km, it
  # left each notebook's kernel (~0.8 GB with jax loaded) running until the test worker exited.
  NotebookClient(nb, km=km, timeout=600,
                 resources={"metadata": {"path": str(path.parent)}}).execute(cleanup_kc=True)
  return nb


def test_there_are_notebooks():
  assert any(p.name == "quickstart.ipynb" for p in NOTEBOOKS)


def test_the_kernel_stops_with_its_notebook(tmp_path, monkeypatch):
  import nbformat
  from jupyter_client import manager

  started = []

  class Recorded(manager.KernelManager):
    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      started.append(self)

  monkeypatch.setattr(manager, "KernelManager", Recorded)
  path = tmp_path / "one_cell.ipynb"
  nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), path)
  execute(path)
  assert len(started) == 1 and not started[0].is_alive()


# What each notebook's text promises a cell's outputs show: {notebook: {cell source part: [...]}}.
PROMISED = {
    "quickstart.ipynb": {
        "--config.num_steps=800": ["config.num_steps differs from the checkpoint's (600 vs now 800)",
                                   "step 800"],
        "m.metrics()": ["bits_per_char", "perplexity"],
    },
    "forecast.ipynb": {
        "m.forecast(": ["point", "q0.1", "q0.9"],
        "m.metrics()": ["seasonal_naive_mase", "coverage_80", "test"],
    },
}


def _text(output) -> str:
  data = output.get("data", {})
  return output.get("text", "") + data.get("text/plain", "") + data.get("text/html", "")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
  nb = execute(path)  # raises CellExecutionError on any cell error
  cells = [c for c in nb.cells if c.cell_type == "code"]
  outputs = [o for c in cells for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot was drawn"
  for part, promised in PROMISED.get(path.name, {}).items():
    cell, = [c for c in cells if part in c.source]
    text = "".join(_text(o) for o in cell.get("outputs", []))
    assert not [p for p in promised if p not in text], (part, text[-3000:])


if __name__ == "__main__":
  import nbformat

  for arg in sys.argv[1:]:
    nbformat.write(execute(Path(arg).absolute()), arg)
